//! Snapshots of a target's whole firewall for ruleset transactions (DESIGN §1): what was read,
//! how each nftables table is owned, the restore documents a rollback runs, the listing shown
//! before and after, and the drift others caused. Pure: text in, text out. The side effects
//! (reading, checking, restoring) live in [`crate::backend::ruleset_txn`].
//!
//! Ownership. `nft list ruleset` shows every nf_tables table, including those iptables-nft
//! writes. A table goes through `iptables-nft-save -c` / `iptables-nft-restore -c` when
//! [`crate::backend::ruleset_txn`] proved that route exact for it (listed by the save without an
//! "incompatible" warning, and restoring the save in a scratch namespace gives back the same
//! `nft list table`); every other table is *native* and is deleted and recreated from its
//! `nft list ruleset` text in one `nft -f`. A native table that holds compat (xt) expressions
//! cannot be restored by either route and refuses the transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::live::fw::IptVariant;
use crate::live::iptables_save::{self, SaveParseError};

/// Version of the serialised [`Snapshot`] and undo record layout.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Table names iptables (both variants) knows.
pub const IPTABLES_TABLES: &[&str] = &["filter", "nat", "mangle", "raw", "security"];

/// Largest `old × new` line product the drift diff aligns line by line; beyond it a changed
/// section is reported as removed and added lines (an LCS table of that size would be large).
pub const DIFF_CELL_LIMIT: usize = 4_000_000;

/// Errors of the pure snapshot logic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// `nft list ruleset` printed something that is not a sequence of table blocks.
    #[error("nft list ruleset, line {line}: unexpected {text:?}")]
    NftListing {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// An iptables dump could not be parsed.
    #[error("{tool}: {source}")]
    Save {
        /// The save tool.
        tool: String,
        /// The parse failure.
        #[source]
        source: SaveParseError,
    },
    /// An iptables-restore dump names IPv4 and IPv6 addresses (one dump is one family).
    #[error("the iptables dump mixes IPv4 ({v4}) and IPv6 ({v6}); give one family per file")]
    MixedFamilies {
        /// An IPv4 token found.
        v4: String,
        /// An IPv6 token found.
        v6: String,
    },
    /// The ruleset format is not one ctguard knows.
    #[error("unknown ruleset format {0:?} (nft, iptables or ip6tables)")]
    Format(String),
    /// A table cannot be restored exactly by any route.
    #[error("table {family} {name} cannot be snapshotted exactly: {why}")]
    Unrestorable {
        /// nft family.
        family: String,
        /// Table name.
        name: String,
        /// Why.
        why: String,
    },
}

/// Format of a ruleset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RulesetFormat {
    /// An `nft -f` script: one transaction.
    Nft,
    /// An iptables-restore dump (one family).
    Iptables,
}

/// Family of an iptables dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4 (`iptables-*`).
    V4,
    /// IPv6 (`ip6tables-*`).
    V6,
}

impl Family {
    /// True for IPv6 (the `v6` argument of [`IptVariant::tool`]).
    pub fn is_v6(self) -> bool {
        self == Family::V6
    }

    /// The nft family of the tables this iptables family writes (`ip` or `ip6`).
    pub fn nft_family(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// Detects the format of a ruleset file: a line starting with `*` and a line `COMMIT` make an
/// iptables-restore dump, anything else is an nft script. Guarantees the same answer as the
/// CLI's detection for the same text.
pub fn detect_format(text: &str) -> RulesetFormat {
    let star = text.lines().any(|l| l.starts_with('*'));
    let commit = text.lines().any(|l| l.trim() == "COMMIT");
    if star && commit {
        RulesetFormat::Iptables
    } else {
        RulesetFormat::Nft
    }
}

/// Resolves the `format` of a [`crate::agent::engine::RulesetInput`]: `nft`, `iptables`
/// (family detected by [`detect_family`]), `ip6tables` (IPv6 forced), or empty (detected by
/// [`detect_format`]). Returns the format and, for a dump, its family.
pub fn resolve_format(format: &str, text: &str) -> Result<(RulesetFormat, Option<Family>), SnapshotError> {
    let fmt = match format {
        "" => detect_format(text),
        "nft" => RulesetFormat::Nft,
        "iptables" | "ip6tables" => RulesetFormat::Iptables,
        other => return Err(SnapshotError::Format(other.to_string())),
    };
    match fmt {
        RulesetFormat::Nft => Ok((fmt, None)),
        RulesetFormat::Iptables if format == "ip6tables" => Ok((fmt, Some(Family::V6))),
        RulesetFormat::Iptables => Ok((fmt, Some(detect_family(text)?))),
    }
}

/// The family of an iptables-restore dump: IPv6 when it names an IPv6 address or ICMPv6 and
/// nothing IPv4-only; IPv4 otherwise (also when nothing tells, as `iptables-restore` would).
/// A dump with evidence of both is an error.
pub fn detect_family(text: &str) -> Result<Family, SnapshotError> {
    let mut v4: Option<String> = None;
    let mut v6: Option<String> = None;
    for line in text.lines().map(str::trim).filter(|l| l.starts_with('-')) {
        for tok in line.split_whitespace() {
            let t = tok.trim_matches('"');
            match t {
                "icmpv6" | "ipv6-icmp" | "--icmpv6-type" | "icmp6" => v6 = v6.or(Some(t.to_string())),
                "icmp" | "--icmp-type" => v4 = v4.or(Some(t.to_string())),
                _ if t.starts_with("icmp6-") => v6 = v6.or(Some(t.to_string())),
                _ if t.starts_with("icmp-") => v4 = v4.or(Some(t.to_string())),
                _ => {
                    for part in t.split([',', '!']) {
                        let (v4_hit, v6_hit) = address_family(part);
                        if v4_hit {
                            v4 = v4.or(Some(part.to_string()));
                        }
                        if v6_hit {
                            v6 = v6.or(Some(part.to_string()));
                        }
                    }
                }
            }
        }
    }
    match (v4, v6) {
        (Some(v4), Some(v6)) => Err(SnapshotError::MixedFamilies { v4, v6 }),
        (None, Some(_)) => Ok(Family::V6),
        _ => Ok(Family::V4),
    }
}

/// (is an IPv4 address, is an IPv6 address) for one token: `A`, `A/len`, `A-B`, `A:port`,
/// `[A]:port`.
fn address_family(tok: &str) -> (bool, bool) {
    let addr = tok.split(['/', '-']).next().unwrap_or_default();
    if let Some(rest) = addr.strip_prefix('[') {
        let inner = rest.split(']').next().unwrap_or_default();
        return (false, inner.parse::<Ipv6Addr>().is_ok());
    }
    if addr.parse::<Ipv6Addr>().is_ok() {
        return (false, true);
    }
    let host = addr.split(':').next().unwrap_or_default();
    (host.parse::<Ipv4Addr>().is_ok(), false)
}

// ---------------------------------------------------------------------------------------------
// What was read

/// One nftables table as `nft list ruleset` printed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftTable {
    /// nft family (`ip`, `ip6`, `inet`, `arp`, `bridge`, `netdev`).
    pub family: String,
    /// Table name.
    pub name: String,
    /// The table's block, `table FAMILY NAME {` to `}`, newline-terminated.
    pub text: String,
    /// nft warned that the table holds compat (xt) expressions ("managed by iptables-nft"):
    /// its text cannot be loaded back with `nft -f`.
    pub xt: bool,
}

impl NftTable {
    /// `FAMILY NAME`, as nft commands take it.
    pub fn id(&self) -> TableId {
        TableId { family: self.family.clone(), name: self.name.clone() }
    }

    /// An iptables-nft table shown by its save instead of `nft list` ([`NftTable::stub`]) has
    /// the kernel fingerprint digest it was read with; a table nft listed has none.
    pub fn stub_digest(&self) -> Option<&str> {
        self.text.lines().nth(1)?.trim().strip_prefix(STUB_MARK).map(str::trim)
    }

    /// The stand-in for an iptables-nft table that its family's `iptables-nft-save` lists (and
    /// that holds nothing but chains): `nft list` of a 100k-rule table takes seconds, its
    /// netlink fingerprint a fraction of one. The block names the table's chains — base
    /// chains with `type … hook …` lines, as [`base_chains`] reads them — and the digest of
    /// `fp`, so two equal tables give equal text and any change to the table changes it. Never
    /// loaded with `nft -f` (such a table is restored by iptables-nft, or listed with nft first).
    pub fn stub(id: &TableId, fp: &crate::backend::nft_fingerprint::TableFingerprint) -> NftTable {
        const HOOKS: [&str; 5] = ["prerouting", "input", "forward", "output", "postrouting"];
        let mut text = format!("table {} {} {{\n\t{STUB_MARK}{}\n", id.family, id.name, fp.digest());
        for (name, base) in fp.chain_outline() {
            let _ = writeln!(text, "\tchain {name} {{");
            if let Some(b) = base {
                let hook = HOOKS.get(b.hook as usize).map_or_else(|| b.hook.to_string(), |h| (*h).to_string());
                let policy = match b.policy {
                    Some(0) => " policy drop;",
                    Some(1) => " policy accept;",
                    _ => "",
                };
                let _ = writeln!(text, "\t\ttype {} hook {hook} priority {};{policy}", b.kind, b.priority);
            }
            text.push_str("\t}\n");
        }
        text.push_str("}\n");
        NftTable { family: id.family.clone(), name: id.name.clone(), text, xt: false }
    }
}

/// The comment line that marks an [`NftTable::stub`], followed by the digest.
pub const STUB_MARK: &str = "# managed by iptables-nft, listed by its save below; kernel fingerprint ";

/// A table's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TableId {
    /// nft family.
    pub family: String,
    /// Table name.
    pub name: String,
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.family, self.name)
    }
}

/// One iptables save, as printed with `-c`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveText {
    /// Which implementation.
    pub variant: IptVariant,
    /// IPv6 (`ip6tables-*`).
    pub v6: bool,
    /// The save tool's stdout.
    pub text: String,
}

impl SaveText {
    /// The save tool's name, e.g. `ip6tables-legacy-save`.
    pub fn tool(&self) -> String {
        self.variant.tool(self.v6, "-save")
    }
}

/// The firewall of a target as read at one moment (between two equal generation ids when
/// `genid` is set): every nft table, every installed iptables save (both variants, both
/// families), and `ipset save`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FwState {
    /// nf_tables generation id the reads were taken at (`None` when not read).
    pub genid: Option<u32>,
    /// `nft list ruleset`, table by table, in the kernel's order.
    pub nft: Vec<NftTable>,
    /// iptables saves (`-c`) of the installed tools, in [`SAVE_ORDER`].
    pub saves: Vec<SaveText>,
    /// `ipset save` (`None` when ipset is not installed).
    pub ipsets: Option<String>,
}

/// The order saves are read, listed and restored in: (variant, v6).
pub const SAVE_ORDER: [(IptVariant, bool); 4] =
    [(IptVariant::Nft, false), (IptVariant::Nft, true), (IptVariant::Legacy, false), (IptVariant::Legacy, true)];

impl FwState {
    /// The save of `variant`/`v6`, if its tool is installed.
    pub fn save(&self, variant: IptVariant, v6: bool) -> Option<&SaveText> {
        self.saves.iter().find(|s| s.variant == variant && s.v6 == v6)
    }

    /// The nft table `id`.
    pub fn table(&self, id: &TableId) -> Option<&NftTable> {
        self.nft.iter().find(|t| t.family == id.family && t.name == id.name)
    }
}

/// A snapshot: the state before the change plus the route each table is restored by.
/// Guarantees (established by [`crate::backend::ruleset_txn::take_snapshot`]): every table in
/// `iptables_nft` comes back exactly from the `iptables-nft-save -c` text in `state`, every
/// other table from its `nft list ruleset` text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Layout version ([`SNAPSHOT_VERSION`]).
    pub version: u32,
    /// What was read.
    pub state: FwState,
    /// Tables restored with `iptables-nft-restore` (family `ip` or `ip6`), in kernel order.
    pub iptables_nft: Vec<TableId>,
}

impl Snapshot {
    /// True when `id` is restored by iptables-nft.
    pub fn is_iptables_nft(&self, id: &TableId) -> bool {
        self.iptables_nft.contains(id)
    }

    /// The native tables (restored by `nft -f`), in kernel order.
    pub fn native_tables(&self) -> impl Iterator<Item = &NftTable> {
        self.state.nft.iter().filter(|t| !self.is_iptables_nft(&t.id()))
    }
}

/// How the ruleset file was applied (recorded in the undo record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyInfo {
    /// Format of the file.
    pub format: RulesetFormat,
    /// Family of an iptables dump.
    pub family: Option<Family>,
    /// Variant an iptables dump was restored with.
    pub variant: Option<IptVariant>,
    /// Generation id right before the apply.
    pub genid_before: Option<u32>,
    /// Generation id right after it.
    pub genid_after: Option<u32>,
    /// Another nf_tables commit happened during the apply (the id moved by more than the
    /// apply's own commits): reported as drift.
    pub concurrent: bool,
    /// The ruleset changed between the snapshot and the apply, so the snapshot was retaken.
    pub resnapshot: bool,
}

/// The undo record of a ruleset transaction (the `undo` JSON in the journal). Guarantees: a
/// rollback needs nothing else — the snapshot alone (as journaled in PREPARED, `apply` still
/// empty) restores the prior state. What ctguard applied is not repeated here: it is the
/// listing the agent journals right after the apply (`after`), the baseline of the drift.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoRecord {
    /// Always `"ruleset"`.
    pub kind: String,
    /// Layout version ([`SNAPSHOT_VERSION`]).
    pub version: u32,
    /// The state to restore.
    pub snapshot: Snapshot,
    /// Generation id the snapshot was read at (the agent journals it as `genid_before`).
    #[serde(default)]
    pub genid_before: Option<u32>,
    /// Generation id right after the apply (journaled as `genid_after`); `None` until then.
    #[serde(default)]
    pub genid_after: Option<u32>,
    /// How the file was applied (`None` until it was).
    #[serde(default)]
    pub apply: Option<ApplyInfo>,
    /// What others changed during the window ([`overwritten`]), filled in by the agent from
    /// the rollback's report.
    #[serde(default)]
    pub drift: Vec<DriftSection>,
    /// Tools used, by absolute path.
    #[serde(default)]
    pub tools: BTreeMap<String, String>,
    /// In memory only (never journaled): the snapshot's native tables were kernel-checked to
    /// load after deleting every native table present before the apply (the whole restore
    /// script, checked before the apply). The check right after the apply then needs only the
    /// deletes of the tables present by then (`crate::backend::ruleset_txn::check_restore_after_apply`).
    #[serde(skip)]
    pub restore_checked: bool,
    /// In memory only (never journaled): the generation id at which the rollback's deletes
    /// passed the kernel check right after the apply (read before and after the check, equal).
    /// While the id is unchanged the ruleset is the one checked, so the agent's rollback check
    /// need not run `nft -c` again (`crate::backend::ruleset_txn::check_restore_after_apply`).
    #[serde(skip)]
    pub deletes_checked_at: Option<u32>,
}

impl UndoRecord {
    /// A record holding only the snapshot (what PREPARED journals).
    pub fn planned(snapshot: Snapshot, tools: BTreeMap<String, String>) -> UndoRecord {
        UndoRecord {
            kind: "ruleset".into(),
            version: SNAPSHOT_VERSION,
            genid_before: snapshot.state.genid,
            genid_after: None,
            snapshot,
            apply: None,
            drift: Vec::new(),
            tools,
            restore_checked: false,
            deletes_checked_at: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing the tools' output

/// Splits `nft list ruleset` output into its table blocks, in order. Guarantees: the
/// concatenation of the blocks' texts is the input minus blank lines between tables.
pub fn split_nft_tables(listing: &str) -> Result<Vec<NftTable>, SnapshotError> {
    let mut out = Vec::new();
    let mut open: Option<(String, String, String)> = None;
    for (i, line) in listing.lines().enumerate() {
        match open.as_mut() {
            Some((_, _, text)) => {
                text.push_str(line);
                text.push('\n');
                if line == "}" {
                    if let Some((family, name, text)) = open.take() {
                        out.push(NftTable { family, name, text, xt: false });
                    }
                }
            }
            None if line.trim().is_empty() => {}
            None => {
                let mut w = line.split_whitespace();
                match (w.next(), w.next(), w.next(), w.next(), w.next()) {
                    (Some("table"), Some(family), Some(name), Some("{"), None) => {
                        open = Some((family.to_string(), name.to_string(), format!("{line}\n")));
                    }
                    _ => return Err(SnapshotError::NftListing { line: i + 1, text: line.to_string() }),
                }
            }
        }
    }
    if let Some((_, _, text)) = open {
        return Err(SnapshotError::NftListing {
            line: listing.lines().count(),
            text: text.lines().next().unwrap_or_default().to_string(),
        });
    }
    Ok(out)
}

/// The tables nft's stderr says hold compat expressions: ``# Warning: table ip filter is
/// managed by iptables-nft, do not touch!``.
pub fn xt_tables(nft_stderr: &str) -> BTreeSet<TableId> {
    nft_stderr
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("# Warning: table ")?;
            let (id, tail) = rest.split_once(" is managed by iptables-nft")?;
            let _ = tail;
            let (family, name) = id.split_once(' ')?;
            Some(TableId { family: family.to_string(), name: name.to_string() })
        })
        .collect()
}

/// One `*table … COMMIT` block of a save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveBlock {
    /// Table name.
    pub name: String,
    /// The block, `*name` to `COMMIT`, newline-terminated.
    pub text: String,
}

/// A save split into its table blocks, with the tables iptables-nft called incompatible.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SaveSplit {
    /// Blocks in order.
    pub blocks: Vec<SaveBlock>,
    /// Tables named by an "incompatible" warning (``# Table `nat' is incompatible, use 'nft'
    /// tool.``, ``# Table `filter' contains incompatible base-chains…``), with the warning.
    pub incompatible: BTreeMap<String, String>,
}

impl SaveSplit {
    /// The block of table `name`.
    pub fn block(&self, name: &str) -> Option<&SaveBlock> {
        self.blocks.iter().find(|b| b.name == name)
    }
}

/// Splits a save into table blocks (comments dropped) and incompatibility warnings. Tolerant:
/// never fails; a warning whose table cannot be named is filed under `"?"`.
pub fn split_save(text: &str) -> SaveSplit {
    let mut out = SaveSplit::default();
    let mut open: Option<SaveBlock> = None;
    for raw in text.lines() {
        let line = raw.trim_end();
        if line.starts_with('#') {
            if iptables_save::is_incompatible_warning(line) {
                let name = line.split('`').nth(1).and_then(|r| r.split('\'').next()).unwrap_or("?");
                out.incompatible.insert(name.to_string(), line.to_string());
            }
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if let Some(b) = open.take() {
                out.blocks.push(b);
            }
            open = Some(SaveBlock { name: name.trim().to_string(), text: format!("{line}\n") });
            continue;
        }
        if let Some(b) = open.as_mut() {
            b.text.push_str(line);
            b.text.push('\n');
            if line.trim() == "COMMIT" {
                if let Some(b) = open.take() {
                    out.blocks.push(b);
                }
            }
        }
    }
    if let Some(b) = open {
        out.blocks.push(b);
    }
    out
}

/// Names of the base chains (`type … hook …`) of an nft table block.
pub fn base_chains(table_text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<&str> = None;
    for line in table_text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("chain ") {
            current = rest.split_whitespace().next();
        } else if t.starts_with("type ") && t.contains(" hook ") {
            if let Some(c) = current.take() {
                out.push(c.trim_matches('"').to_string());
            }
        }
    }
    out
}

/// A table block as an order-free map: item header (`chain INPUT {`, `set s {`, or a bare
/// table-level line) → the item's normalised text. Two tables with equal maps hold the same
/// chains, sets and objects, whatever order nft lists them in.
pub fn table_items(table_text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut open: Option<(String, String)> = None;
    for line in table_text.lines().skip(1) {
        if let Some((_, body)) = open.as_mut() {
            body.push_str(&normalize_nft_line(line));
            body.push('\n');
            if line == "\t}" {
                if let Some((k, v)) = open.take() {
                    out.insert(k, v);
                }
            }
            continue;
        }
        let t = line.trim();
        if t.is_empty() || line == "}" {
            continue;
        }
        if t.ends_with('{') {
            open = Some((t.to_string(), String::new()));
        } else {
            out.insert(t.to_string(), String::new());
        }
    }
    if let Some((k, v)) = open {
        out.insert(k, v);
    }
    out
}

/// True when the table block declares anything besides chains (sets, maps, stateful objects,
/// flowtables, flags): things an iptables save cannot carry.
pub fn has_non_chain_items(table_text: &str) -> bool {
    table_text
        .lines()
        .skip(1)
        .filter(|l| l.starts_with('\t') && !l.starts_with("\t\t"))
        .map(str::trim)
        // (`#` lines: the mark of an [`NftTable::stub`]; nft prints none in a listing.)
        .any(|l| !(l.is_empty() || l == "}" || l.starts_with("chain ") || l.starts_with('#')))
}

/// The restore block for one iptables-nft table: the save's block with the declarations of
/// built-in chains that do not exist in nf_tables removed (iptables-nft creates base chains
/// only when used; `iptables-nft-restore` would create every declared one).
pub fn ipt_nft_block(block: &SaveBlock, table_text: &str) -> String {
    let present: BTreeSet<String> = base_chains(table_text).into_iter().collect();
    let mut out = String::new();
    for line in block.text.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let mut w = decl.split_whitespace();
            if let (Some(name), Some(policy)) = (w.next(), w.next()) {
                if policy != "-" && !present.contains(name) {
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// iptables-nft tables a snapshot could restore through the save: `ip`/`ip6` tables with an
/// iptables name that the save of their family lists without an "incompatible" warning and
/// that declare nothing but chains. The caller proves each candidate in a scratch namespace.
pub fn ipt_nft_candidates(state: &FwState) -> Vec<TableId> {
    let splits: Vec<(bool, SaveSplit)> = [false, true]
        .into_iter()
        .filter_map(|v6| state.save(IptVariant::Nft, v6).map(|s| (v6, split_save(&s.text))))
        .collect();
    state
        .nft
        .iter()
        .filter(|t| IPTABLES_TABLES.contains(&t.name.as_str()))
        .filter(|t| !has_non_chain_items(&t.text))
        .filter(|t| {
            let v6 = match t.family.as_str() {
                "ip" => false,
                "ip6" => true,
                _ => return false,
            };
            splits.iter().any(|(f, s)| *f == v6 && s.block(&t.name).is_some() && !s.incompatible.contains_key(&t.name))
        })
        .map(NftTable::id)
        .collect()
}

/// The `iptables-nft-restore` documents that rebuild `tables` (each must be in `state`'s save
/// of its family): consecutive tables of one family share a document, in the order given, so
/// the tables are recreated in that order. Returns (v6, document) pairs.
pub fn ipt_nft_restore_docs(state: &FwState, tables: &[TableId]) -> Vec<(bool, String)> {
    let splits: BTreeMap<bool, SaveSplit> = [false, true]
        .into_iter()
        .filter_map(|v6| state.save(IptVariant::Nft, v6).map(|s| (v6, split_save(&s.text))))
        .collect();
    let mut out: Vec<(bool, String)> = Vec::new();
    for id in tables {
        let v6 = id.family == "ip6";
        let (Some(split), Some(table)) = (splits.get(&v6), state.table(id)) else { continue };
        let Some(block) = split.block(&id.name) else { continue };
        let text = ipt_nft_block(block, &table.text);
        match out.last_mut() {
            Some((f, doc)) if *f == v6 => doc.push_str(&text),
            _ => out.push((v6, text)),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Restore documents

/// The first part of [`nft_restore_script`]: `add table` + `delete table` (deleted whether or
/// not it still exists) for every table of `current` that iptables-nft does not restore, in
/// `current`'s order; empty when there is none. Pure.
pub fn nft_delete_script(snapshot: &Snapshot, current: &[TableId]) -> String {
    let mut s = String::new();
    for id in current.iter().filter(|id| !snapshot.is_iptables_nft(id)) {
        let _ = writeln!(s, "add table {} {}", id.family, id.name);
        let _ = writeln!(s, "delete table {} {}", id.family, id.name);
    }
    s
}

/// The one `nft -f` script of a rollback: every table present now (`current`) is deleted
/// except those the snapshot restores through iptables-nft (their restore replaces them
/// atomically), then the snapshot's native tables are created from their text, in the
/// snapshot's order. Each delete is preceded by `add table` so it cannot fail on a table
/// removed meanwhile. Never `flush table` (it keeps sets and chains: the union). Returns an
/// empty string when there is nothing to do.
pub fn nft_restore_script(snapshot: &Snapshot, current: &[TableId]) -> String {
    let mut s = nft_delete_script(snapshot, current);
    for t in snapshot.native_tables() {
        s.push_str(&t.text);
    }
    s
}

/// The `iptables-legacy-restore -c` document of one family: the snapshot's save, plus every
/// table present now (`current`) but not in the snapshot, emptied (built-in chains with
/// policy ACCEPT, no rules, no user chains) — a legacy table cannot be removed. `None` when
/// there is nothing to restore.
pub fn legacy_restore_doc(
    snapshot_save: Option<&str>,
    current_save: Option<&str>,
) -> Result<Option<String>, SnapshotError> {
    let parse = |t: &str| {
        iptables_save::parse(t).map_err(|source| SnapshotError::Save { tool: "iptables-legacy-save".into(), source })
    };
    let mut doc = String::new();
    let mut have = BTreeSet::new();
    if let Some(text) = snapshot_save {
        for b in split_save(text).blocks {
            have.insert(b.name.clone());
            doc.push_str(&b.text);
        }
    }
    if let Some(text) = current_save {
        // Only the tables the snapshot lacks are parsed (a 10k-rule table the snapshot has
        // need not be).
        let new: String =
            split_save(text).blocks.into_iter().filter(|b| !have.contains(&b.name)).map(|b| b.text).collect();
        for t in parse(&new)?.tables.iter() {
            let _ = writeln!(doc, "*{}", t.name);
            for c in t.chains.iter().filter(|c| c.is_builtin()) {
                let _ = writeln!(doc, ":{} ACCEPT [0:0]", c.name);
            }
            doc.push_str("COMMIT\n");
        }
    }
    Ok((!doc.is_empty()).then_some(doc))
}

/// The ipsets the snapshot's iptables rules (both variants, both families) reference:
/// `--match-set NAME`, `--add-set NAME`, `--del-set NAME`, `--map-set NAME`.
pub fn referenced_ipsets(state: &FwState) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in &state.saves {
        for line in s.text.lines() {
            let toks: Vec<&str> = line.split_whitespace().collect();
            for w in toks.windows(2) {
                if matches!(w[0], "--match-set" | "--add-set" | "--del-set" | "--map-set") {
                    out.insert(w[1].trim_matches('"').to_string());
                }
            }
        }
    }
    out
}

/// Set names created by an `ipset save` text, with their `create` line and `add` lines.
pub fn ipset_blocks(save: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for line in save.lines() {
        let mut w = line.split_whitespace();
        if let (Some("create" | "add"), Some(name)) = (w.next(), w.next()) {
            let e = out.entry(name.to_string()).or_default();
            e.push_str(line);
            e.push('\n');
        }
    }
    out
}

/// The `ipset restore` text that recreates, from the snapshot, the referenced sets missing now;
/// `None` when none is missing. Sets that exist are left alone: their content is runtime data
/// (fail2ban bans, `-j SET` additions), not part of a ruleset file.
pub fn missing_ipsets_restore(snapshot: &FwState, current_save: &str) -> Option<String> {
    let snap = ipset_blocks(snapshot.ipsets.as_deref().unwrap_or_default());
    let now = ipset_blocks(current_save);
    let text: String = referenced_ipsets(snapshot)
        .iter()
        .filter(|n| !now.contains_key(*n))
        .filter_map(|n| snap.get(n).cloned())
        .collect();
    (!text.is_empty()).then_some(text)
}

/// The iptables variant a `--format iptables` dump is applied with: legacy when the target
/// uses legacy tables (a rule, a user chain or a non-ACCEPT policy in either family) and no
/// iptables-nft table; iptables-nft otherwise (Debian's default, also on a bare target).
/// The second value is a warning when both are in use.
pub fn choose_variant(snapshot: &Snapshot) -> (IptVariant, Option<String>) {
    choose_variant_of(&snapshot.state, &snapshot.iptables_nft)
}

/// [`choose_variant`] of a state whose iptables-nft tables are `iptables_nft` (a snapshot's
/// proven ones, or — before the proof — its [`ipt_nft_candidates`], which the proof can only
/// shrink: the guess it gives is then confirmed or corrected by [`choose_variant`]). Pure.
pub fn choose_variant_of(state: &FwState, iptables_nft: &[TableId]) -> (IptVariant, Option<String>) {
    let legacy_used = [false, true].into_iter().any(|v6| {
        state.save(IptVariant::Legacy, v6).is_some_and(|s| {
            iptables_save::parse(&s.text).is_ok_and(|d| {
                d.tables.iter().any(|t| {
                    t.chains
                        .iter()
                        .any(|c| !c.rules.is_empty() || !c.is_builtin() || c.policy.as_deref() != Some("ACCEPT"))
                })
            })
        })
    });
    let nft_used = !iptables_nft.is_empty();
    match (legacy_used, nft_used) {
        (true, false) => (IptVariant::Legacy, None),
        (true, true) => (
            IptVariant::Nft,
            Some(
                "both iptables-legacy and iptables-nft tables are in use; the dump is applied with iptables-nft".into(),
            ),
        ),
        _ => (IptVariant::Nft, None),
    }
}

// ---------------------------------------------------------------------------------------------
// Listing and drift

/// Zeroes what changes with traffic or time in one line of `nft list ruleset`: counter
/// values (`packets N bytes M`), quota usage (`used N UNIT`, dropped: nft omits it at zero), element expiry (`expires D`),
/// and `last used D`. Guarantees: two listings of an unchanged ruleset normalise equal.
pub fn normalize_nft_line(line: &str) -> String {
    let toks: Vec<&str> = line.split(' ').collect();
    let mut out: Vec<String> = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let next = toks.get(i + 1).copied();
        let is_num = |s: Option<&str>| {
            s.is_some_and(|s| !s.is_empty() && s.trim_end_matches([',', '}']).bytes().all(|b| b.is_ascii_digit()))
        };
        match t {
            "packets" | "bytes" if is_num(next) => {
                out.push(t.to_string());
                out.push(keep_punct(next.unwrap_or_default(), "0"));
                i += 2;
            }
            "used" if out.last().is_some_and(|p| p.trim() == "last") => {
                // `last used 1s ago` / `last used never`: drop the time.
                let skip = if toks.get(i + 2).is_some_and(|s| s.trim_end_matches([',', '}']) == "ago") { 3 } else { 2 };
                let tail = toks.get(i + skip - 1).map(|s| punct_of(s)).unwrap_or_default();
                if let Some(l) = out.last_mut() {
                    l.push_str(tail);
                }
                i += skip;
            }
            "used" if is_num(next) => {
                // Quota usage: nft omits `used 0 bytes`, so drop it whatever the value.
                let tail = toks.get(i + 2).map(|s| punct_of(s)).unwrap_or_default();
                if let Some(l) = out.last_mut() {
                    l.push_str(tail);
                }
                i += 3;
            }
            "expires" if next.is_some() => {
                let tail = punct_of(next.unwrap_or_default());
                if let Some(l) = out.last_mut() {
                    l.push_str(tail);
                }
                i += 2;
            }
            _ => {
                out.push(t.to_string());
                i += 1;
            }
        }
    }
    out.join(" ")
}

/// Trailing `,` / `}` of a token.
fn punct_of(tok: &str) -> &str {
    let core = tok.trim_end_matches([',', '}']);
    &tok[core.len()..]
}

/// `replacement` with the trailing punctuation of `tok`.
fn keep_punct(tok: &str, replacement: &str) -> String {
    format!("{replacement}{}", punct_of(tok))
}

/// Normalises a whole table block ([`normalize_nft_line`] on every line).
pub fn normalize_nft(text: &str) -> String {
    text.lines().map(|l| normalize_nft_line(l) + "\n").collect()
}

/// Normalises an iptables save: comments dropped, chain counters `[0:0]`, rule counter
/// prefixes removed. Guarantees: a save with and without `-c` of the same rules normalise
/// equal.
pub fn normalize_save(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let l = line.trim_end();
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        if let Some(decl) = l.strip_prefix(':') {
            let mut w = decl.split_whitespace();
            if let (Some(name), Some(policy)) = (w.next(), w.next()) {
                let _ = writeln!(out, ":{name} {policy} [0:0]");
                continue;
            }
        }
        let l = match l.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map(|(_, r)| r).unwrap_or(l),
            None => l,
        };
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Normalises `ipset save`: element timeouts and counters zeroed.
pub fn normalize_ipsets(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("add ") {
            let toks: Vec<&str> = line.split(' ').collect();
            let mut keep: Vec<&str> = Vec::with_capacity(toks.len());
            let mut i = 0;
            while i < toks.len() {
                if matches!(toks[i], "timeout" | "packets" | "bytes") && i + 1 < toks.len() {
                    keep.push(toks[i]);
                    keep.push("0");
                    i += 2;
                } else {
                    keep.push(toks[i]);
                    i += 1;
                }
            }
            out.push_str(&keep.join(" "));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The listing of a state for `show` and the before/after diff: `nft list ruleset`, then each
/// installed save, then `ipset save`, each under a `## TOOL` header, all normalised (counters
/// zeroed). Guarantees: equal states give equal listings, whatever traffic did meanwhile.
pub fn listing(state: &FwState) -> String {
    let mut out = String::from("## nft list ruleset\n");
    for t in &state.nft {
        out.push_str(&normalize_nft(&t.text));
    }
    for s in &state.saves {
        let _ = writeln!(out, "## {}", s.tool());
        out.push_str(&normalize_save(&s.text));
    }
    if let Some(ip) = &state.ipsets {
        out.push_str("## ipset save\n");
        out.push_str(&normalize_ipsets(ip));
    }
    out
}

/// Reads a [`listing`] back into a state (normalised values, no generation id): the inverse
/// of `listing` as far as [`sections`] can tell. Unknown `## ` headers are errors.
pub fn state_from_listing(text: &str) -> Result<FwState, SnapshotError> {
    let mut st = FwState::default();
    let mut current: Option<(String, String)> = None;
    let flush = |st: &mut FwState, cur: Option<(String, String)>| -> Result<(), SnapshotError> {
        let Some((head, body)) = cur else { return Ok(()) };
        if head == "nft list ruleset" {
            st.nft = split_nft_tables(&body)?;
        } else if head == "ipset save" {
            st.ipsets = Some(body);
        } else if let Some(&(variant, v6)) = SAVE_ORDER.iter().find(|(v, v6)| v.tool(*v6, "-save") == head) {
            st.saves.push(SaveText { variant, v6, text: body });
        } else {
            return Err(SnapshotError::NftListing { line: 0, text: format!("## {head}") });
        }
        Ok(())
    };
    for line in text.lines() {
        if let Some(head) = line.strip_prefix("## ") {
            flush(&mut st, current.take())?;
            current = Some((head.to_string(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    flush(&mut st, current.take())?;
    Ok(st)
}

/// Sections of a state for the drift diff: nft tables, save tables and ipsets, each under a
/// stable key, normalised.
pub fn sections(state: &FwState) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for t in &state.nft {
        out.insert(format!("nft table {} {}", t.family, t.name), normalize_nft(&t.text));
    }
    for s in &state.saves {
        let split = split_save(&s.text);
        for b in &split.blocks {
            out.insert(format!("{} {}", s.tool(), b.name), normalize_save(&b.text));
        }
        for (name, warning) in &split.incompatible {
            out.insert(format!("{} {name} (warning)", s.tool()), format!("{warning}\n"));
        }
    }
    if let Some(ip) = &state.ipsets {
        for (name, text) in ipset_blocks(ip) {
            out.insert(format!("ipset {name}"), normalize_ipsets(&text));
        }
    }
    out
}

/// One section that differs between two states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftSection {
    /// `nft table inet t`, `iptables-legacy-save filter`, `ipset blk`, …
    pub section: String,
    /// Changed lines only: `- old`, `+ new`.
    pub diff: Vec<String>,
    /// True when a rollback replaces this section with the snapshot's (every nft table and
    /// iptables table); false for ipset contents, which a rollback keeps (see
    /// [`missing_ipsets_restore`]).
    #[serde(default)]
    pub overwritten: bool,
}

/// What differs between `from` (e.g. what ctguard applied) and `to` (what is there now),
/// section by section; empty when nothing does. Counters and timers are ignored.
pub fn drift(from: &FwState, to: &FwState) -> Vec<DriftSection> {
    let a = sections(from);
    let b = sections(to);
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let (old, new) = (a.get(k).map(String::as_str).unwrap_or(""), b.get(k).map(String::as_str).unwrap_or(""));
        if old != new {
            out.push(DriftSection {
                section: k.clone(),
                diff: changed_lines(old, new),
                overwritten: !k.starts_with("ipset "),
            });
        }
    }
    out
}

/// What others changed during the window, which a rollback to `snapshot` overwrites (ipset
/// contents excepted, flagged `overwritten: false`): the sections where the state `now` differs both from what ctguard `applied` and from the
/// snapshot, each as the diff applied → now. A section already back to its snapshot content
/// is not drift (a second rollback reports nothing); counters and timers are ignored.
pub fn overwritten(snapshot: &FwState, applied: &FwState, now: &FwState) -> Vec<DriftSection> {
    let s = sections(snapshot);
    let a = sections(applied);
    let n = sections(now);
    let keys: BTreeSet<&String> = a.keys().chain(n.keys()).collect();
    let get = |m: &BTreeMap<String, String>, k: &String| m.get(k).cloned().unwrap_or_default();
    // An iptables-nft table read as a stub on one side and listed by nft on the other (a
    // transaction journaled by a build that listed it, rolled back by one that reads stubs):
    // the two texts cannot be compared, and its content is compared in its save's section.
    let is_stub = |m: &BTreeMap<String, String>, k: &String| m.get(k).is_some_and(|t| t.contains(STUB_MARK));
    let mixed = |k: &String| {
        k.starts_with("nft table ") && a.contains_key(k) && n.contains_key(k) && is_stub(&a, k) != is_stub(&n, k)
    };
    keys.into_iter()
        .filter(|k| !mixed(k))
        .filter(|k| get(&n, k) != get(&a, k) && get(&n, k) != get(&s, k))
        .map(|k| DriftSection {
            section: k.clone(),
            diff: changed_lines(&get(&a, k), &get(&n, k)),
            overwritten: !k.starts_with("ipset "),
        })
        .collect()
}

/// The changed lines between two texts (`- old`, `+ new`): common head and tail trimmed, the
/// middle aligned with the line diff ([`crate::diff::diff_lines`]) when small enough
/// ([`DIFF_CELL_LIMIT`]), else listed whole.
pub fn changed_lines(old: &str, new: &str) -> Vec<String> {
    let a: Vec<String> = old.lines().map(str::to_string).collect();
    let b: Vec<String> = new.lines().map(str::to_string).collect();
    let head = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let tail = a[head..].iter().rev().zip(b[head..].iter().rev()).take_while(|(x, y)| x == y).count();
    let (ma, mb) = (&a[head..a.len() - tail], &b[head..b.len() - tail]);
    if ma.len().saturating_mul(mb.len()) <= DIFF_CELL_LIMIT {
        crate::diff::diff_lines(ma, mb).into_iter().filter(|l| !l.starts_with("  ")).collect()
    } else {
        ma.iter().map(|l| format!("- {l}")).chain(mb.iter().map(|l| format!("+ {l}"))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "table inet t1 {\n\tset s {\n\t\ttype ipv4_addr\n\t}\n\n\tchain c {\n\t\tcounter packets 3 bytes 180 accept\n\t}\n}\ntable ip filter {\n\tchain INPUT {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tip saddr 1.2.3.4 counter packets 0 bytes 0 drop\n\t}\n}\n";

    fn state() -> FwState {
        FwState {
            genid: Some(7),
            nft: split_nft_tables(LISTING).expect("split"),
            saves: vec![SaveText {
                variant: IptVariant::Nft,
                v6: false,
                text: "# Generated by x\n*filter\n:INPUT ACCEPT [5:300]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n[1:60] -A INPUT -s 1.2.3.4/32 -j DROP\nCOMMIT\n# Completed\n".into(),
            }],
            ipsets: Some("create blk hash:ip family inet hashsize 1024 maxelem 65536\nadd blk 1.2.3.4 timeout 30\n".into()),
        }
    }

    #[test]
    fn detects_formats_and_families() {
        assert_eq!(detect_format("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n"), RulesetFormat::Iptables);
        assert_eq!(detect_format("table inet x {\n}\n"), RulesetFormat::Nft);
        assert_eq!(detect_family("*filter\n-A INPUT -s 2001:db8::/32 -j DROP\nCOMMIT\n"), Ok(Family::V6));
        assert_eq!(detect_family("*filter\n-A INPUT -p ipv6-icmp -j ACCEPT\nCOMMIT\n"), Ok(Family::V6));
        assert_eq!(detect_family("*filter\n-A INPUT -s 10.0.0.0/8 -j DROP\nCOMMIT\n"), Ok(Family::V4));
        assert_eq!(detect_family("*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"), Ok(Family::V4));
        assert_eq!(
            detect_family("*nat\n-A PREROUTING -j DNAT --to-destination [fd00::1]:53\nCOMMIT\n"),
            Ok(Family::V6)
        );
        assert!(matches!(
            detect_family("*filter\n-A INPUT -s 10.0.0.1 -j DROP\n-A INPUT -d ::1 -j DROP\nCOMMIT\n"),
            Err(SnapshotError::MixedFamilies { .. })
        ));
        assert!(detect_family("*filter\n-A INPUT -m mac --mac-source 00:11:22:33:44:55 -j DROP\nCOMMIT\n").is_ok());
        assert_eq!(resolve_format("ip6tables", "*filter\nCOMMIT\n"), Ok((RulesetFormat::Iptables, Some(Family::V6))));
        assert!(resolve_format("pf", "").is_err());
    }

    #[test]
    fn splits_tables_and_finds_base_chains() {
        let t = split_nft_tables(LISTING).expect("split");
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].family.as_str(), t[0].name.as_str()), ("inet", "t1"));
        assert!(t[0].text.starts_with("table inet t1 {\n") && t[0].text.ends_with("}\n"));
        assert_eq!(base_chains(&t[1].text), vec!["INPUT".to_string()]);
        assert!(base_chains(&t[0].text).is_empty());
        assert!(has_non_chain_items(&t[0].text));
        assert!(!has_non_chain_items(&t[1].text));
        assert!(split_nft_tables("oops\n").is_err());
        assert!(split_nft_tables("table ip x {\n").is_err());
    }

    #[test]
    fn xt_warnings() {
        let w = xt_tables("# Warning: table ip filter is managed by iptables-nft, do not touch!\nnoise\n");
        assert!(w.contains(&TableId { family: "ip".into(), name: "filter".into() }));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn save_split_and_incompatible() {
        let text = "# Table `nat' is incompatible, use 'nft' tool.\n*mangle\n:INPUT ACCEPT [0:0]\nCOMMIT\n# Table `filter' contains incompatible base-chains, use 'nft' tool to list them.\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        let s = split_save(text);
        assert_eq!(s.blocks.len(), 2);
        assert!(s.incompatible.contains_key("nat") && s.incompatible.contains_key("filter"));
        assert_eq!(s.block("mangle").map(|b| b.text.as_str()), Some("*mangle\n:INPUT ACCEPT [0:0]\nCOMMIT\n"));
    }

    #[test]
    fn ipt_nft_docs_declare_only_existing_base_chains() {
        let st = state();
        let cands = ipt_nft_candidates(&st);
        assert_eq!(cands, vec![TableId { family: "ip".into(), name: "filter".into() }]);
        let docs = ipt_nft_restore_docs(&st, &cands);
        assert_eq!(docs.len(), 1);
        assert!(!docs[0].0);
        assert_eq!(docs[0].1, "*filter\n:INPUT ACCEPT [5:300]\n[1:60] -A INPUT -s 1.2.3.4/32 -j DROP\nCOMMIT\n");
    }

    #[test]
    fn restore_script_deletes_current_native_tables_and_recreates_the_snapshot() {
        let snap = Snapshot {
            version: 1,
            state: state(),
            iptables_nft: vec![TableId { family: "ip".into(), name: "filter".into() }],
        };
        let current = vec![
            TableId { family: "inet".into(), name: "t1".into() },
            TableId { family: "ip".into(), name: "filter".into() },
            TableId { family: "ip".into(), name: "mangle".into() },
        ];
        let s = nft_restore_script(&snap, &current);
        assert!(s.starts_with(
            "add table inet t1\ndelete table inet t1\nadd table ip mangle\ndelete table ip mangle\ntable inet t1 {\n"
        ));
        assert!(!s.contains("delete table ip filter"));
        assert!(!s.contains("flush"));
        assert!(!s.contains("table ip filter {"));
    }

    #[test]
    fn legacy_doc_empties_new_tables() {
        let snap = "*filter\n:INPUT DROP [1:2]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let now = "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let d = legacy_restore_doc(Some(snap), Some(now)).expect("doc").expect("some");
        assert_eq!(d, format!("{snap}*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\nCOMMIT\n"));
        assert_eq!(legacy_restore_doc(None, None), Ok(None));
    }

    #[test]
    fn ipsets_missing_only() {
        let mut st = state();
        st.saves[0].text.push_str("*raw\n-A PREROUTING -m set --match-set blk src -j DROP\nCOMMIT\n");
        assert_eq!(referenced_ipsets(&st).into_iter().collect::<Vec<_>>(), vec!["blk".to_string()]);
        assert!(missing_ipsets_restore(&st, "").is_some_and(|t| t.starts_with("create blk ")));
        assert_eq!(missing_ipsets_restore(&st, "create blk hash:ip\n"), None);
    }

    #[test]
    fn normalises_volatile_values() {
        assert_eq!(
            normalize_nft_line("\t\tcounter packets 3 bytes 180 accept"),
            "\t\tcounter packets 0 bytes 0 accept"
        );
        assert_eq!(normalize_nft_line("\t\tquota over 10 mbytes used 123 kbytes"), "\t\tquota over 10 mbytes");
        assert_eq!(normalize_nft_line("\t\tquota 1 mbytes used 86 bytes"), "\t\tquota 1 mbytes");
        assert_eq!(
            normalize_nft_line("\t\telements = { 1.2.3.4 timeout 1h expires 59m58s, 5.6.7.8 timeout 1h expires 3s }"),
            "\t\telements = { 1.2.3.4 timeout 1h, 5.6.7.8 timeout 1h }"
        );
        assert_eq!(normalize_nft_line("\t\tlast used 2s ago drop"), "\t\tlast drop");
        assert_eq!(normalize_nft_line("\t\tlast used never drop"), "\t\tlast drop");
        assert_eq!(
            normalize_nft_line("\t\tip saddr 1.2.3.4  counter packets 1 bytes 2 drop"),
            "\t\tip saddr 1.2.3.4  counter packets 0 bytes 0 drop"
        );
        assert_eq!(normalize_save(&state().saves[0].text), "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -s 1.2.3.4/32 -j DROP\nCOMMIT\n");
        assert!(normalize_ipsets("add blk 1.2.3.4 timeout 30\n").contains("timeout 0"));
    }

    #[test]
    fn drift_is_per_section_and_ignores_counters() {
        let a = state();
        let mut b = state();
        assert!(drift(&a, &b).is_empty());
        b.nft[1].text = b.nft[1].text.replace("counter packets 0 bytes 0", "counter packets 9 bytes 99");
        assert!(drift(&a, &b).is_empty());
        b.nft[0].text = b.nft[0].text.replace("accept", "drop");
        let d = drift(&a, &b);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].section, "nft table inet t1");
        assert_eq!(
            d[0].diff,
            vec![
                "+ \t\tcounter packets 0 bytes 0 drop".to_string(),
                "- \t\tcounter packets 0 bytes 0 accept".to_string()
            ]
        );
        // Back to the snapshot is not drift; a third change is.
        assert!(overwritten(&a, &b, &a).is_empty());
        let mut c = a.clone();
        c.nft[1].text = c.nft[1].text.replace("drop", "reject");
        let o = overwritten(&a, &b, &c);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].section, "nft table ip filter");
    }

    /// Regression (upgrade with a transaction pending): a build that listed iptables-nft's
    /// tables with nft journaled the state after the apply; this build reads them as stubs.
    /// The stub and the listing are not drift; a change in the table's save still is.
    #[test]
    fn a_stub_against_an_nft_listing_of_the_same_table_is_not_drift() {
        let listed = state();
        let mut stubbed = listed.clone();
        stubbed.nft[1].text = format!("table ip filter {{\n\t{STUB_MARK}0123abcd\n\tchain INPUT {{\n\t}}\n}}\n");
        assert!(overwritten(&listed, &listed, &stubbed).is_empty(), "{:?}", overwritten(&listed, &listed, &stubbed));
        let mut changed = stubbed.clone();
        changed.saves[0].text = changed.saves[0].text.replace("-j DROP", "-j ACCEPT");
        let o = overwritten(&listed, &listed, &changed);
        assert_eq!(o.iter().map(|d| d.section.as_str()).collect::<Vec<_>>(), ["iptables-nft-save filter"], "{o:?}");
        // Two stubs still compare (a different fingerprint is drift).
        let mut other = stubbed.clone();
        other.nft[1].text = other.nft[1].text.replace("0123abcd", "ffff0000");
        assert_eq!(overwritten(&listed, &stubbed, &other).len(), 1);
    }

    #[test]
    fn listing_reads_back() {
        let st = state();
        let back = state_from_listing(&listing(&st)).expect("parses");
        assert_eq!(sections(&back), sections(&st));
        assert_eq!(back.nft.len(), 2);
        assert!(state_from_listing("## nope\n").is_err());
    }

    #[test]
    fn listing_is_stable() {
        let l = listing(&state());
        assert!(l.starts_with("## nft list ruleset\ntable inet t1 {\n"));
        assert!(l.contains("## iptables-nft-save\n*filter\n:INPUT ACCEPT [0:0]\n"));
        assert!(l.contains("## ipset save\n"));
        assert!(!l.contains("# Generated"));
    }

    #[test]
    fn variant_choice() {
        let mut snap = Snapshot { version: 1, state: FwState::default(), iptables_nft: vec![] };
        assert_eq!(choose_variant(&snap).0, IptVariant::Nft);
        snap.state.saves.push(SaveText {
            variant: IptVariant::Legacy,
            v6: false,
            text: "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n".into(),
        });
        assert_eq!(choose_variant(&snap).0, IptVariant::Nft, "an empty legacy table is not use");
        snap.state.saves[0].text = "*filter\n:INPUT DROP [0:0]\nCOMMIT\n".into();
        assert_eq!(choose_variant(&snap).0, IptVariant::Legacy);
        snap.iptables_nft.push(TableId { family: "ip".into(), name: "filter".into() });
        let (v, w) = choose_variant(&snap);
        assert_eq!(v, IptVariant::Nft);
        assert!(w.is_some());
    }
}
