//! Policy transactions (DESIGN §1, §6): prepare (read, plan, lint, kernel-check: changes
//! nothing), apply (in the order that never leaves a flow untracked but not yet accepted),
//! check the rollback, roll back by tag. Runs in the calling thread's network namespace: call
//! it inside `crate::netns::Target::run`.
//!
//! What ctguard owns and therefore changes: `table inet ctguard`; the iptables raw chains
//! `CTGUARD-PRE`/`CTGUARD-OUT` with one jump each; the `ct state untracked` accept rules it
//! inserts into other tables' filter chains, each with the comment `ctguard:TXID`; the sysctls
//! it writes. Nothing else is written, so what others change meanwhile survives a rollback.
//!
//! Atomicity:
//! - **nft**: one netlink batch carrying the generation id read in [`prepare`]: the previous
//!   transaction's accept rules deleted, `table inet ctguard` replaced (or deleted when the
//!   backend is iptables and a table exists) and the accept rules inserted before the dropping
//!   rule — all or nothing; a ruleset changed since the read refuses it (`ERESTART`).
//! - **iptables**: `iptables-restore --noflush -w`, committed per table: the previous
//!   transaction's rules deleted and the new ones inserted in the same table commit. Filter
//!   insertions go first, ctguard's raw chains after the nft batch; IPv4 and IPv6 (and both
//!   variants) are one unit: a failure anywhere undoes everything applied before it.
//! - The **rollback** of the nft side: the previous `table inet ctguard` (restored from its
//!   listing, which round-trips, DESIGN §10) and the previous transaction's rules go back in one
//!   `nft -f` (by name and anchor, no delete by handle); then the tagged rules, read over
//!   netlink with their handles right after the generation id, are deleted in one netlink batch
//!   carrying that id (with the table when nothing replaces it), read again on `ERESTART`.
//! - **Generation id**: a change by another writer between ctguard's read and its commit is
//!   never re-based on: apply undoes what it applied and fails with a retryable error
//!   ([`PolicyTxnError::retryable`]).
//!
//! Differences the kernel makes unavoidable: a legacy (x_tables) table, once instantiated in a
//! namespace, cannot be removed — an apply that creates ctguard's raw chains where no legacy
//! `raw` table existed leaves an empty one after rollback. iptables-nft's `table ip raw` and
//! base chains created by apply are deleted again by rollback when they are empty (an object
//! deletion through nft, never a rule written into an iptables-nft table).

mod accept;
pub mod guard;
mod ipt_nft_now;
mod ipt_nft_undo;

pub use ipt::{RawChains, Variant};

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::backend::exec::{ExecError, Tool};
use crate::backend::iptables::{self as ipt_backend, IptablesError};
use crate::backend::live::{self as live_backend, LiveError, SAVE_TOOLS};
use crate::backend::netlink::{
    check_batch, dump_chain_rules, get_genid, get_rule, send_batch, send_batch_echoed, NetlinkError, RuleInfo,
};
use crate::backend::nft_monitor::NftMonitor;
use crate::exit::Exit;
use crate::lint::{lint, Finding, LintInput, Severity, SshConn};
use crate::live::fw::{FwTables, IptVariant, Owner};
use crate::live::iptables_save::{self, SaveDump};
use crate::live::nft_text;
use crate::live::{nft_json, LiveState};
use crate::model::auto::MachineFacts;
use crate::model::names::{SysctlKey, Tag, TAG_PREFIX};
use crate::model::{Backend, Policy};
use crate::render::conntrack_flush::flush_commands;
use crate::render::ipt_edit as ipt;
use crate::render::ipt_sim;
use crate::render::iptables::{notrack_rules, IpFamily, RAW_TABLE};
use crate::render::nft_batch::{BatchBuffer, BatchBuilder, BatchError, InsertedRule, RulePosition};
use crate::render::nft_ir::{table_for, TableIr, TABLE_NAME};
use crate::render::nft_script::replace_script;
use crate::render::planner::{plan_chains, InsertionPlan, Position, RuleSpec};
use crate::render::sysctl::{plan_sysctls, SysctlChange};
use crate::sysctl::SysctlError;

/// How often [`prepare`] re-reads the live state when the generation id moved while it read.
pub const SNAPSHOT_ATTEMPTS: usize = 5;
pub use crate::render::conntrack_flush::FLUSH_MAX_PORTS;
/// How often the nft part of a rollback is rebuilt from a fresh read and retried.
pub const NFT_ROLLBACK_ATTEMPTS: usize = 3;

/// `net.netfilter.nf_conntrack_max`.
const CONNTRACK_MAX: &str = "net.netfilter.nf_conntrack_max";
/// `net.netfilter.nf_conntrack_count`.
const CONNTRACK_COUNT: &str = "net.netfilter.nf_conntrack_count";

/// Errors of a policy transaction. [`PolicyTxnError::exit`] maps each to the CLI contract.
#[derive(Debug, thiserror::Error)]
pub enum PolicyTxnError {
    /// A tool the transaction needs is not installed (exit 2, nothing changed).
    #[error("{tool} is needed but cannot be used")]
    MissingTool {
        /// The tool.
        tool: String,
        /// Why.
        #[source]
        source: ExecError,
    },
    /// Explicit sysctls the target does not let ctguard write (exit 2, nothing changed).
    #[error("{}", .problems.join("; "))]
    SysctlUnwritable {
        /// `sysctl."KEY": reason`, one per key.
        problems: Vec<String>,
    },
    /// Reading the live state failed.
    #[error("reading the live state failed")]
    Live(#[source] LiveError),
    /// Reading the ruleset generation id failed.
    #[error("reading the nf_tables generation id failed")]
    Genid(#[source] NetlinkError),
    /// The generation id moved during every snapshot attempt (exit 3).
    #[error("the ruleset kept changing while it was read ({attempts} attempts); nothing was applied")]
    Unstable {
        /// Attempts made.
        attempts: usize,
    },
    /// The lint found errors and `force` was not given (exit 3, nothing changed).
    #[error("lint found {} error(s); refused without --force: {}", .0.len(), .0.join("; "))]
    Lint(Vec<String>),
    /// `nft -c` refused the apply (or rollback) script (exit 3, nothing changed).
    #[error("kernel check of the nft script failed")]
    NftCheck(#[source] ExecError),
    /// A scratch-namespace check's thread panicked (exit 1, nothing changed).
    #[error("a scratch-namespace check panicked")]
    ScratchPanicked,
    /// The kernel refused the nft batch sent as a check (no BATCH_END: nothing committed;
    /// exit 3, nothing changed).
    #[error("kernel check of the nft batch failed")]
    NftBatchCheck(#[source] NetlinkError),
    /// The kernel refused an iptables document in a scratch namespace (exit 3).
    #[error("kernel check of the {variant}/{family} iptables document failed")]
    IptCheck {
        /// Variant (`nft`, `legacy`).
        variant: &'static str,
        /// `iptables` or `ip6tables`.
        family: &'static str,
        /// The check's failure.
        #[source]
        source: Box<IptablesError>,
    },
    /// The ruleset changed between prepare and apply (exit 3, nothing applied).
    #[error("the ruleset changed since it was read ({0}); nothing was applied")]
    Stale(String),
    /// The nft batch could not be encoded (exit 1, nothing applied).
    #[error("encoding the nft batch failed")]
    Batch(#[source] BatchError),
    /// The kernel refused the batch because the ruleset changed since `genid` was read (exit 3);
    /// everything applied before the batch was rolled back.
    #[error("the ruleset changed since generation {genid} was read; nothing was applied")]
    GenerationChanged {
        /// The generation id the batch carried.
        genid: u32,
        /// The kernel's answer.
        #[source]
        source: NetlinkError,
    },
    /// Another writer changed the nf_tables ruleset while apply ran (the generation id moved by
    /// more than ctguard's own commits): nothing more was applied and what this attempt had
    /// applied was rolled back (exit 3, retryable).
    #[error("another writer changed the ruleset {during} (nf_tables generation moved by {moved}, ctguard's own commits account for {own}); nothing more was applied and what this attempt applied was rolled back")]
    ForeignChange {
        /// When.
        during: String,
        /// How far the generation id moved.
        moved: u32,
        /// ctguard's own commits in that span.
        own: u32,
    },
    /// A step of apply failed; everything applied before it was rolled back (exit 3).
    #[error("{step} failed; what was applied before it was rolled back")]
    ApplyFailed {
        /// The step.
        step: String,
        /// Why.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A step of apply failed and so did undoing the steps before it (exit 7).
    #[error("{step} failed, and rolling back what was applied failed too: {rollback}")]
    ApplyAndRollbackFailed {
        /// The step.
        step: String,
        /// The rollback's failures.
        rollback: String,
        /// Why the step failed.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// Rollback could not undo everything (exit 7: state unknown, operator needed).
    #[error("rollback failed: {}", .failures.join("; "))]
    RollbackFailed {
        /// What failed, one line each.
        failures: Vec<String>,
    },
    /// The undo record is not usable (exit 2).
    #[error("undo record: {0}")]
    BadUndo(String),
    /// Running a tool failed.
    #[error("{what}")]
    Exec {
        /// What ctguard was doing.
        what: String,
        /// The tool's failure.
        #[source]
        source: ExecError,
    },
    /// An iptables operation failed.
    #[error("iptables")]
    Iptables(#[source] Box<IptablesError>),
    /// A sysctl could not be read.
    #[error("sysctl")]
    Sysctl(#[source] SysctlError),
    /// An iptables save could not be parsed.
    #[error("{tool} printed an unusable dump")]
    Dump {
        /// The save tool.
        tool: String,
        /// Why.
        #[source]
        source: iptables_save::SaveParseError,
    },
    /// nft's JSON could not be parsed.
    #[error("nft -j list ruleset")]
    NftJson(#[source] nft_json::NftJsonError),
    /// Reading the rules of a chain over netlink (GETRULE dump) failed.
    #[error("reading the rules of {chain} over netlink failed")]
    RuleDump {
        /// `family table chain`.
        chain: String,
        /// Why.
        #[source]
        source: NetlinkError,
    },
}

impl PolicyTxnError {
    /// True for a generation-id conflict: another writer changed the ruleset between ctguard's
    /// read and its commit, and nothing of the attempt is left applied (re-read, re-plan, retry).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            PolicyTxnError::Stale(_) | PolicyTxnError::GenerationChanged { .. } | PolicyTxnError::ForeignChange { .. }
        )
    }

    /// The CLI exit code (DESIGN §5): 2 failed precondition (unwritable sysctl, missing tool,
    /// bad undo record); 3 refused (lint, kernel check, changed ruleset, a failed and undone
    /// apply step); 7 a rollback that could not complete; 1 anything unexpected.
    pub fn exit(&self) -> Exit {
        use PolicyTxnError::*;
        match self {
            MissingTool { .. } | SysctlUnwritable { .. } | BadUndo(_) => Exit::BadInput,
            Exec { source: ExecError::NotFound(_), .. } => Exit::BadInput,
            Unstable { .. }
            | Lint(_)
            | NftCheck(_)
            | NftBatchCheck(_)
            | IptCheck { .. }
            | Stale(_)
            | GenerationChanged { .. }
            | ForeignChange { .. }
            | ApplyFailed { .. }
            | Dump { .. } => Exit::Refused,
            Live(LiveError::Save { .. }) => Exit::Refused,
            ApplyAndRollbackFailed { .. } | RollbackFailed { .. } => Exit::RollbackFailed,
            _ => Exit::Internal,
        }
    }
}

/// What to apply: a policy under a transaction tag.
#[derive(Debug, Clone)]
pub struct PolicyRequest {
    /// The validated policy.
    pub policy: Policy,
    /// `ctguard:TXID`: the comment of every rule this transaction creates.
    pub tag: Tag,
    /// Apply despite lint errors.
    pub force: bool,
    /// The requester's SSH connection, for the lint.
    pub ssh: Option<SshConn>,
    /// The undo record of the COMMITTED policy transaction this one replaces, if any: its
    /// accept rules are removed (and put back by this one's rollback).
    pub previous: Option<PolicyUndo>,
}

/// One iptables-restore document for one variant and family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptDoc {
    /// Variant.
    pub variant: Variant,
    /// IPv6 (`ip6tables-*`) when true.
    pub v6: bool,
    /// The text for `*-restore --noflush -w`.
    pub text: String,
}

/// `table inet ctguard` before a transaction touched it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableBefore {
    /// `nft list table inet ctguard` before, or `None` when there was none.
    pub text: Option<String>,
}

/// An nft accept rule this transaction inserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftInsertion {
    /// nft family of the table.
    pub family: String,
    /// Table.
    pub table: String,
    /// Chain.
    pub chain: String,
    /// Handle read back after the commit (a hint; `None` before).
    pub handle: Option<u64>,
    /// The rule as nft text.
    pub rule: String,
}

/// An iptables accept rule this transaction inserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IptInsertion {
    /// Variant.
    pub variant: Variant,
    /// IPv6 when true.
    pub v6: bool,
    /// Table (`filter`).
    pub table: String,
    /// Chain.
    pub chain: String,
    /// The exact arguments after `-A CHAIN`.
    pub spec: Vec<String>,
}

/// ctguard's raw chains of one variant and family before this transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawBefore {
    /// Variant.
    pub variant: Variant,
    /// IPv6 when true.
    pub v6: bool,
    /// Contents and jumps before.
    pub before: RawChains,
    /// Jumps this transaction adds: (from, to).
    pub jumps_added: Vec<(String, String)>,
    /// iptables-nft only: whether nft had `table ip|ip6 raw` before.
    pub nft_table_existed: bool,
    /// iptables-nft only: the chains of that table before.
    pub nft_chains_before: Vec<String>,
}

/// A sysctl this transaction writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysctlWritten {
    /// Dotted key.
    pub key: String,
    /// Value before.
    pub old: u64,
    /// Value written.
    pub new: u64,
}

/// An accept rule of the previous transaction that this one removes, with where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Removed {
    /// A native nft rule.
    Nft {
        /// Family.
        family: String,
        /// Table.
        table: String,
        /// Chain.
        chain: String,
        /// Its handle when removed.
        handle: u64,
        /// Its text as `nft -a list` printed it (round-trips through `nft -f`).
        text: String,
        /// Handle of the next rule that stays (it goes back before that one), if any.
        anchor: Option<u64>,
    },
    /// An iptables rule.
    Iptables {
        /// Variant.
        variant: Variant,
        /// IPv6 when true.
        v6: bool,
        /// Table.
        table: String,
        /// Chain.
        chain: String,
        /// Its `-A` line as saved.
        line: String,
        /// Its 1-based index then.
        index: usize,
        /// The `-A` line of the next rule that stays, if any.
        anchor: Option<String>,
    },
}

/// Everything needed to undo one policy transaction, found by tag on a fresh read: what it
/// created, what it replaced, the values it overwrote. Serializable for the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyUndo {
    /// `ctguard:TXID`.
    pub tag: String,
    /// The effective backend of the transaction.
    pub backend: Backend,
    /// Generation id of the snapshot.
    pub genid_before: u32,
    /// Generation id after apply (None until applied).
    pub genid_after: Option<u32>,
    /// `Some` when the transaction replaced or deleted `table inet ctguard`.
    pub table: Option<TableBefore>,
    /// nft accept rules inserted.
    pub nft_insertions: Vec<NftInsertion>,
    /// iptables accept rules inserted.
    pub ipt_insertions: Vec<IptInsertion>,
    /// ctguard's raw chains touched, with their state before.
    pub raw: Vec<RawBefore>,
    /// Sysctls written, in order.
    pub sysctls: Vec<SysctlWritten>,
    /// The previous transaction's accept rules removed by this one.
    pub removed_previous: Vec<Removed>,
    /// Warnings of apply (skipped flushes, generation drift).
    pub warnings: Vec<String>,
    /// iptables-nft's tagged rules as the kernel announced them when apply's restore committed
    /// them (empty when unknown). A hint for the rollback, which reads each back by handle and
    /// deletes it only if it still prints as its line. Absent from older journal records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipt_nft_handles: Vec<IptNftHandle>,
}

/// A rule of iptables-nft's as the kernel announced it after a commit: where, its handle, and
/// its save line (`-A CHAIN …`, as `iptables-nft-save` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IptNftHandle {
    /// IPv6 (`ip6` family) when true.
    pub v6: bool,
    /// Table.
    pub table: String,
    /// Chain.
    pub chain: String,
    /// The kernel's handle (unique in its table until the table is recreated).
    pub handle: u64,
    /// The save line.
    pub line: String,
}

impl PolicyUndo {
    /// The undo of a transaction tagged `tag` that created nothing yet (nft backend): its
    /// rollback removes whatever carries the tag and nothing else.
    pub fn empty(tag: &str) -> PolicyUndo {
        PolicyUndo {
            tag: tag.to_string(),
            backend: Backend::Nft,
            genid_before: 0,
            genid_after: None,
            table: None,
            nft_insertions: Vec::new(),
            ipt_insertions: Vec::new(),
            raw: Vec::new(),
            sysctls: Vec::new(),
            removed_previous: Vec::new(),
            warnings: Vec::new(),
            ipt_nft_handles: Vec::new(),
        }
    }

    fn tag(&self) -> Result<Tag, PolicyTxnError> {
        let id = self
            .tag
            .strip_prefix(TAG_PREFIX)
            .ok_or_else(|| PolicyTxnError::BadUndo(format!("{:?} is not a ctguard tag", self.tag)))?;
        Tag::new(id).map_err(PolicyTxnError::BadUndo)
    }

    /// The sysctl keys this undo restores.
    pub fn sysctl_keys(&self) -> Vec<SysctlKey> {
        self.sysctls.iter().filter_map(|s| SysctlKey::parse(&s.key).ok()).collect()
    }
}

/// What [`prepare`] found and built. Holding it changes nothing; [`apply`] applies exactly it.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The request.
    pub request: PolicyRequest,
    /// Effective backend (`auto` resolved).
    pub backend: Backend,
    /// The live state as read (the previous transaction's rules included).
    pub live: LiveState,
    /// The planned accept insertions (planned without the previous transaction's rules).
    pub plan: InsertionPlan,
    /// Resolved sysctls.
    pub sysctls: Vec<SysctlChange>,
    /// Lint findings (errors only when `force`).
    pub findings: Vec<Finding>,
    /// Generation id read before and after the snapshot (equal).
    pub genid: u32,
    /// [`listing`] before, for display and tests.
    pub before: String,
    /// The nft side as one `nft -f` script: what the batch does, as text (a kernel test loads
    /// both and compares). The kernel check sends the batch itself, not this script.
    pub nft_script: String,
    /// iptables filter documents (insertions, previous rules removed), applied first.
    pub ipt_filter: Vec<IptDoc>,
    /// iptables raw documents (ctguard's chains), applied after the nft batch.
    pub ipt_raw: Vec<IptDoc>,
    /// `conntrack` argument vectors for `flush_existing`.
    pub flush: Vec<Vec<String>>,
    /// Warnings (skipped sysctls, skipped flushes).
    pub warnings: Vec<String>,
    table: Option<TableIr>,
    /// `table inet ctguard` is deleted (a policy with nothing to notrack).
    delete_table: bool,
    dumps: Vec<(Variant, bool, String)>,
    undo: PolicyUndo,
    /// The sysctls the scope listings show.
    scope_keys: Vec<SysctlKey>,
    /// `table inet ctguard` at the snapshot, as nft lists it.
    scope_table_text: Option<String>,
    /// The snapshot's rules in the chains of [`scope_chains`] (for [`after_listing`]).
    scope_rules: Vec<ScopedChain>,
    /// The kernel check ([`prepare`]) also checked the nft rollback's deletes after the
    /// batch's messages (see [`kernel_check_covering_rollback`]).
    nft_rollback_checked: bool,
}

impl Prepared {
    /// The undo record of everything [`apply`] will do (handles not yet known; every planned
    /// sysctl write included): journal it before applying, so a crash mid-apply can be rolled
    /// back by tag. Rolling it back when nothing was applied changes nothing that matters.
    pub fn undo_record(&self) -> PolicyUndo {
        let mut u = self.undo.clone();
        u.sysctls = self.sysctl_writes();
        u
    }

    /// The sysctls [`Prepared::before`] and [`after_listing`] show.
    pub fn scope_keys(&self) -> &[SysctlKey] {
        &self.scope_keys
    }

    fn sysctl_writes(&self) -> Vec<SysctlWritten> {
        self.sysctls
            .iter()
            .filter(|c| c.skipped.is_none() && !c.unchanged)
            .filter_map(|c| c.old.map(|old| SysctlWritten { key: c.key.to_string(), old, new: c.new }))
            .collect()
    }

    /// True when applying would change nothing.
    pub fn is_noop(&self) -> bool {
        self.table.is_none()
            && self.ipt_filter.is_empty()
            && self.ipt_raw.is_empty()
            && self.plan.insertions.is_empty()
            && self.undo.removed_previous.is_empty()
            && self.sysctl_writes().is_empty()
    }
}

/// The backend `auto` resolves to on this machine: nft when installed, else iptables-nft,
/// else iptables-legacy. Other values are returned as they are.
pub fn effective_backend(b: Backend) -> Backend {
    match b {
        Backend::Auto if Tool::find("nft").is_ok() => Backend::Nft,
        Backend::Auto if Tool::find("iptables-nft-restore").is_ok() => Backend::IptablesNft,
        Backend::Auto => Backend::IptablesLegacy,
        b => b,
    }
}

/// The iptables variant of an iptables backend (`None` for nft and auto).
pub fn variant_of(b: Backend) -> Option<IptVariant> {
    match b {
        Backend::IptablesNft => Some(IptVariant::Nft),
        Backend::IptablesLegacy => Some(IptVariant::Legacy),
        _ => None,
    }
}

fn family(v6: bool) -> IpFamily {
    if v6 {
        IpFamily::V6
    } else {
        IpFamily::V4
    }
}

fn tool(name: &str) -> Result<Tool, PolicyTxnError> {
    Tool::find(name).map_err(|source| PolicyTxnError::MissingTool { tool: name.to_string(), source })
}

fn boxed(e: impl StdError + Send + Sync + 'static) -> Box<dyn StdError + Send + Sync> {
    Box::new(e)
}

/// One consistent read: live state (the nft ruleset over netlink, with every rule's handle and
/// comment) and ctguard's table, between two equal generation ids.
struct Snapshot {
    genid: u32,
    live: LiveState,
    table_text: Option<String>,
}

fn snapshot() -> Result<Snapshot, PolicyTxnError> {
    for attempt in 1..=SNAPSHOT_ATTEMPTS {
        let g0 = get_genid().map_err(PolicyTxnError::Genid)?;
        let live = live_backend::read().map_err(PolicyTxnError::Live)?;
        // ctguard's own table as nft prints it (what a rollback loads back), only when it
        // exists: `nft list table` of a small table, not a listing of the ruleset.
        let table_text = if live.nft.has_table("inet", TABLE_NAME) || live_backend::nft_read_json() {
            live_backend::ctguard_table_text().map_err(PolicyTxnError::Live)?
        } else {
            None
        };
        let g1 = get_genid().map_err(PolicyTxnError::Genid)?;
        if g0 == g1 {
            return Ok(Snapshot { genid: g0, live, table_text });
        }
        tracing::debug!(attempt, g0, g1, "the generation id moved during the snapshot; reading again");
    }
    Err(PolicyTxnError::Unstable { attempts: SNAPSHOT_ATTEMPTS })
}

/// The rules of nft chain `c` of table `t` (family `f`) in `r` as (place, handle, comment), one
/// per nft rule (a verdict map's expansion shares its rule's handle), in order; `text` left
/// empty. Only the chains a transaction looks at are listed (a whole-ruleset list cost 4
/// allocations a rule). Pure.
fn listed_in(r: &nft_json::NftRuleset, f: &str, t: &str, c: &str) -> Vec<nft_text::ListedRule> {
    chain_rules_in(r, f, t, c)
        .into_iter()
        .map(|(handle, comment)| nft_text::ListedRule {
            family: f.to_string(),
            table: t.to_string(),
            chain: c.to_string(),
            handle,
            text: String::new(),
            comment,
        })
        .collect()
}

/// The rules of nft chain `c` of table `t` (family `f`) in `r` as (handle, comment), one per
/// nft rule (a verdict map's expansion shares its rule's handle), in order. Pure.
fn chain_rules_in(r: &nft_json::NftRuleset, f: &str, t: &str, c: &str) -> ChainRules {
    let chain =
        r.fw.chains
            .iter()
            .find(|ch| ch.name == c && matches!(&ch.owner, Owner::Nft { family, table } if family == f && table == t));
    let Some(ch) = chain else { return Vec::new() };
    let mut out: ChainRules = Vec::with_capacity(ch.rules.len());
    for rule in &ch.rules {
        let Some(handle) = rule.handle else { continue };
        if out.last().is_some_and(|(h, _)| *h == handle) {
            continue;
        }
        out.push((handle, rule.comment.clone()));
    }
    out
}

/// The nft ruleset rendered one line per table, chain and rule (handles left out), in the
/// `table FAMILY NAME {` layout [`tables_of`] splits: what [`foreign_change_summary`] compares.
fn ruleset_text(r: &nft_json::NftRuleset) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for (f, n) in &r.tables {
        let _ = writeln!(s, "table {f} {n} {{");
        for ch in
            r.fw.chains.iter().filter(|c| matches!(&c.owner, Owner::Nft { family, table } if family == f && table == n))
        {
            let _ =
                writeln!(s, "\tchain {} {:?} {:?} {} {:?}", ch.name, ch.hook, ch.kind, ch.priority, ch.policy_accept);
            for rule in &ch.rules {
                let _ = writeln!(s, "\t\t{} {:?} {:?} {:?}", rule.text, rule.conds, rule.verdict, rule.comment);
            }
        }
        let _ = writeln!(s, "}}");
    }
    s
}

/// The text of the previous transaction's rule with `handle` in a chain, for
/// [`Removed::Nft::text`] (what a rollback loads back with `nft -f`): the rule as the previous
/// undo record wrote it, matched by the handle the kernel echoed; else as `nft -a list chain`
/// prints it (a record without handles).
fn previous_rule_text(
    prev: &PolicyUndo,
    r: &nft_text::ListedRule,
    listed_chains: &mut std::collections::HashMap<(String, String, String), Vec<nft_text::ListedRule>>,
) -> Result<String, PolicyTxnError> {
    if let Some(i) = prev
        .nft_insertions
        .iter()
        .find(|i| i.handle == Some(r.handle) && i.family == r.family && i.table == r.table && i.chain == r.chain)
    {
        return Ok(i.rule.clone());
    }
    let key = (r.family.clone(), r.table.clone(), r.chain.clone());
    if !listed_chains.contains_key(&key) {
        let what = format!("nft -a list chain {} {} {}", r.family, r.table, r.chain);
        let text = tool("nft")?
            .run(&["-a", "list", "chain", &r.family, &r.table, &r.chain], None)
            .map_err(|source| PolicyTxnError::Exec { what, source })?;
        listed_chains.insert(key.clone(), nft_text::rules(&text));
    }
    listed_chains
        .get(&key)
        .and_then(|rules| rules.iter().find(|x| x.handle == r.handle))
        .map(|x| x.text.clone())
        .ok_or_else(|| {
            PolicyTxnError::Stale(format!(
                "rule handle {} of nft {} {} {} is gone since the snapshot",
                r.handle, r.family, r.table, r.chain
            ))
        })
}

fn dump_of(live: &LiveState, variant: IptVariant, v6: bool) -> Option<&crate::live::IptDump> {
    live.iptables.iter().find(|d| d.variant == variant && d.v6 == v6)
}

fn parse_dump(text: &str, variant: IptVariant, v6: bool) -> Result<SaveDump, PolicyTxnError> {
    iptables_save::parse(text).map_err(|source| PolicyTxnError::Dump { tool: variant.tool(v6, "-save"), source })
}

/// The previous transaction's accept rules in the snapshot, and the chains to plan against
/// ([`LiveState::chains`], one copy) without them.
fn strip_previous(snap: &Snapshot, previous: Option<&PolicyUndo>) -> Result<(FwTables, Vec<Removed>), PolicyTxnError> {
    let mut tables = snap.live.chains();
    let Some(prev) = previous else { return Ok((tables, Vec::new())) };
    let tag = prev.tag.as_str();
    let mut removed = Vec::new();
    let mut listed_chains = std::collections::HashMap::new();
    // nft: the chains the previous transaction inserted into, in listing order.
    let mut nft_chains: Vec<(&str, &str, &str)> =
        prev.nft_insertions.iter().map(|i| (i.family.as_str(), i.table.as_str(), i.chain.as_str())).collect();
    nft_chains.sort_unstable();
    nft_chains.dedup();
    for (f, t, c) in &nft_chains {
        let listed = listed_in(&snap.live.nft, f, t, c);
        let rules: Vec<&nft_text::ListedRule> = listed.iter().collect();
        for (i, r) in rules.iter().enumerate() {
            if r.comment.as_deref() != Some(tag) {
                continue;
            }
            let anchor = rules[i + 1..].iter().find(|x| x.comment.as_deref() != Some(tag)).map(|x| x.handle);
            removed.push(Removed::Nft {
                family: r.family.clone(),
                table: r.table.clone(),
                chain: r.chain.clone(),
                handle: r.handle,
                text: previous_rule_text(prev, r, &mut listed_chains)?,
                anchor,
            });
        }
        for ch in tables.chains.iter_mut() {
            if matches!(&ch.owner, Owner::Nft { family, table } if family == f && table == t) && ch.name == *c {
                ch.rules.retain(|r| r.comment.as_deref() != Some(tag));
                for (i, r) in ch.rules.iter_mut().enumerate() {
                    r.index = i + 1;
                }
            }
        }
    }
    // iptables.
    let mut ipt_chains: Vec<(Variant, bool, &str, &str)> =
        prev.ipt_insertions.iter().map(|i| (i.variant, i.v6, i.table.as_str(), i.chain.as_str())).collect();
    ipt_chains.sort_unstable();
    ipt_chains.dedup();
    for (variant, v6, table, chain) in ipt_chains {
        let Some(d) = dump_of(&snap.live, variant.into(), v6) else { continue };
        let dump = parse_dump(&d.text, variant.into(), v6)?;
        let Some(c) = dump.chain(table, chain) else { continue };
        for (i, r) in c.rules.iter().enumerate() {
            if ipt::comment(r).as_deref() != Some(tag) {
                continue;
            }
            let anchor =
                c.rules[i + 1..].iter().find(|x| ipt::comment(x).as_deref() != Some(tag)).map(|x| x.line.clone());
            removed.push(Removed::Iptables {
                variant,
                v6,
                table: table.to_string(),
                chain: chain.to_string(),
                line: r.line.clone(),
                index: i + 1,
                anchor,
            });
        }
        for ch in tables.chains.iter_mut() {
            let ours = matches!(&ch.owner, Owner::Iptables { variant: cv, v6: c6, table: t }
                if Variant::from(*cv) == variant && *c6 == v6 && t == table);
            if ours && ch.name == chain {
                ch.rules.retain(|r| r.comment.as_deref() != Some(tag));
                for (i, r) in ch.rules.iter_mut().enumerate() {
                    r.index = i + 1;
                }
            }
        }
    }
    Ok((tables, removed))
}

/// Reads the target, plans, lints and kernel-checks the apply documents.
///
/// Guarantees: **changes nothing** in the target (reads only; kernel checks run with `nft -c`
/// and in a scratch namespace; no iptables command that could instantiate a table). The live
/// state is read between two equal generation ids (up to [`SNAPSHOT_ATTEMPTS`] reads). Fails
/// with exit 2 for a missing tool or an explicit sysctl the target cannot write (naming the
/// key), exit 3 for lint errors without `force` or a refused kernel check.
pub fn prepare(req: &PolicyRequest, facts: MachineFacts) -> Result<Prepared, PolicyTxnError> {
    let mut prepared = prepare_with(req, facts, PrepareMode::APPLY)?;
    prepared.nft_rollback_checked = kernel_check_covering_rollback(&prepared)?;
    Ok(prepared)
}

/// What [`prepare_with`] does with lint errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareMode {
    /// Lint errors fail with exit 3 unless the request is forced (`apply`); otherwise they are
    /// returned in [`Prepared::findings`] (`plan`, `restore`'s comparison).
    pub refuse_on_lint: bool,
}

impl PrepareMode {
    /// As `apply` prepares.
    pub const APPLY: PrepareMode = PrepareMode { refuse_on_lint: true };
    /// As `plan` prepares: every finding returned, none refused.
    pub const PLAN: PrepareMode = PrepareMode { refuse_on_lint: false };
}

/// The one planning core of `plan`, `apply`, `restore` and the guard's repairs: reads the
/// target (one snapshot), removes the previous committed transaction's accepts from the view,
/// plans the accepts and ctguard's own objects, lints, and builds every document apply would
/// send. Changes nothing; no kernel check (see [`kernel_check`]).
pub fn prepare_with(req: &PolicyRequest, facts: MachineFacts, mode: PrepareMode) -> Result<Prepared, PolicyTxnError> {
    // Saves are shared only between apply's listing and its rollback check: never stale here.
    ipt_backend::share_saves(false);
    let policy = &req.policy;
    let tag = &req.tag;
    let backend = effective_backend(policy.backend);
    if backend == Backend::Nft {
        tool("nft")?;
    }
    let lap = crate::timing::Lap::start("prepare: snapshot");
    let snap = snapshot()?;
    drop(lap);
    crate::fault::foreign_change("prepare:foreign-change");
    let lap = crate::timing::Lap::start("prepare: plan");
    let sub = crate::timing::Lap::start("plan: the chains without the previous transaction");
    let (tables, removed) = strip_previous(&snap, req.previous.as_ref())?;
    drop(sub);
    let sub = crate::timing::Lap::start("plan: insertions");
    let plan = plan_chains(policy, &tables, tag);
    drop(sub);

    // Sysctls.
    let sysctl_live = live_backend::read_sysctls(policy.sysctl.keys()).map_err(PolicyTxnError::Live)?;
    let (sysctls, problems) = plan_sysctls(policy, &sysctl_live, facts);
    if !problems.is_empty() {
        return Err(PolicyTxnError::SysctlUnwritable {
            problems: problems.iter().map(|p| format!("sysctl.\"{}\": {}", p.key, p.reason)).collect(),
        });
    }
    let mut warnings: Vec<String> = sysctls
        .iter()
        .filter_map(|c| c.skipped.as_ref().map(|why| format!("sysctl {} skipped: {why}", c.key)))
        .collect();

    // Lint.
    let sub = crate::timing::Lap::start("plan: lint");
    let findings = lint(&LintInput { policy, tables: &tables, plan: &plan, sysctls: &sysctls, ssh: req.ssh });
    let errors: Vec<String> =
        findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.to_string()).collect();
    drop(sub);
    if !errors.is_empty() && !req.force && mode.refuse_on_lint {
        return Err(PolicyTxnError::Lint(errors));
    }
    if req.force {
        for f in findings.iter().filter(|f| f.severity == Severity::Error) {
            warnings.push(format!("forced past: {f}"));
        }
    }
    // Lint warnings reach the operator on apply as on plan (a lost rate limit, an ICMP error
    // that will be dropped as INVALID, …).
    for f in findings.iter().filter(|f| f.severity == Severity::Warning && f.code != "sysctl-skipped") {
        warnings.push(f.to_string());
    }

    // The nft side. A policy with nothing to notrack (`apply --remove`) deletes ctguard's table.
    let delete_table = policy.notrack.is_empty() && snap.table_text.is_some();
    let table = if policy.notrack.is_empty() {
        None
    } else if backend == Backend::Nft {
        Some(table_for(policy, tag))
    } else if snap.table_text.is_some() {
        Some(TableIr { name: TABLE_NAME.into(), sets: Vec::new(), chains: Vec::new() })
    } else {
        None
    };
    let mut nft_script = String::new();
    if let Some(t) = &table {
        nft_script.push_str(&replace_script(t));
    }
    if delete_table {
        let _ = writeln!(nft_script, "delete table inet {TABLE_NAME}");
    }
    for r in &removed {
        if let Removed::Nft { family, table, chain, handle, .. } = r {
            let _ = writeln!(nft_script, "delete rule {family} {table} {chain} handle {handle}");
        }
    }
    nft_script.push_str(&plan.nft_script());
    if !nft_script.is_empty() {
        tool("nft")?;
    }

    // The iptables side.
    let variant = variant_of(backend);
    let mut ipt_filter = Vec::new();
    let mut ipt_raw = Vec::new();
    let mut raw_before = Vec::new();
    for v in IptVariant::ALL {
        for v6 in [false, true] {
            let dump = dump_of(&snap.live, v, v6);
            // Filter: previous rules out, new ones in, in one table commit.
            let mut extra: Vec<(String, Vec<String>)> = Vec::new();
            for r in &removed {
                if let Removed::Iptables { variant: rv, v6: r6, table, line, .. } = r {
                    if IptVariant::from(*rv) == v && *r6 == v6 {
                        let del = match line.strip_prefix("-A ") {
                            Some(rest) => format!("-D {rest}"),
                            None => continue,
                        };
                        match extra.iter_mut().find(|(t, _)| t == table) {
                            Some((_, l)) => l.push(del),
                            None => extra.push((table.clone(), vec![del])),
                        }
                    }
                }
            }
            let text = ipt::merge_first(&plan.iptables_restore(v, v6), &extra);
            if !text.is_empty() {
                tool(&v.tool(v6, "-restore"))?;
                ipt_filter.push(IptDoc { variant: v.into(), v6, text });
            }
            // Raw: ctguard's chains for the backend's variant; removed from any other.
            let Some(dump) = dump else {
                if variant == Some(v) {
                    return Err(PolicyTxnError::MissingTool {
                        tool: v.tool(v6, "-save"),
                        source: ExecError::NotFound(v.tool(v6, "-save")),
                    });
                }
                continue;
            };
            // Only the raw table is needed here: parse that block, not the whole dump again.
            let parsed = parse_dump(&ipt::table_block(&dump.text, RAW_TABLE), v, v6)?;
            let now = ipt::raw_chains(&parsed);
            let rules = notrack_rules(policy, family(v6), tag);
            let (doc, jumps_added) = if variant == Some(v) && !rules.is_empty() {
                let missing: Vec<_> = rules
                    .jumps
                    .iter()
                    .filter(|j| !now.jumps.iter().any(|(f, t)| f == j.from && t == j.to))
                    .cloned()
                    .collect();
                let added = missing.iter().map(|j| (j.from.to_string(), j.to.to_string())).collect();
                (Some(rules.restore_text(&missing)), added)
            } else {
                (ipt::raw_restore(&RawChains::default(), &now, &[]), Vec::new())
            };
            let Some(doc) = doc else { continue };
            tool(&v.tool(v6, "-restore"))?;
            let nft_family = if v6 { "ip6" } else { "ip" };
            let nft_table_existed = v == IptVariant::Nft && snap.live.nft.has_table(nft_family, "raw");
            let nft_chains_before = snap
                .live
                .nft
                .fw
                .chains
                .iter()
                .filter(|c| matches!(&c.owner, Owner::Nft { family, table } if family == nft_family && table == "raw"))
                .map(|c| c.name.clone())
                .collect();
            raw_before.push(RawBefore {
                variant: v.into(),
                v6,
                before: now,
                jumps_added,
                nft_table_existed,
                nft_chains_before,
            });
            ipt_raw.push(IptDoc { variant: v.into(), v6, text: doc });
        }
    }

    // flush_existing.
    let local = crate::probe::local_interface_addresses().unwrap_or_default();
    let (flush, flush_warnings) = flush_commands(policy, &local);
    warnings.extend(flush_warnings);
    if !flush.is_empty() {
        tool("conntrack")?;
    }

    // The iptables dumps each document applies to (checked against them at apply time).
    let mut dumps = Vec::new();
    for v in IptVariant::ALL {
        for v6 in [false, true] {
            if ipt_filter.iter().chain(ipt_raw.iter()).any(|d| IptVariant::from(d.variant) == v && d.v6 == v6) {
                let live_text = dump_of(&snap.live, v, v6).map(|d| d.text.as_str()).unwrap_or("");
                dumps.push((v.into(), v6, ipt::normalize_save(live_text)));
            }
        }
    }

    // The undo record as planned.
    let nft_insertions = plan
        .insertions
        .iter()
        .filter_map(|ins| match (&ins.owner, &ins.rule) {
            (Owner::Nft { family, table }, RuleSpec::Nft(rule)) => Some(NftInsertion {
                family: family.clone(),
                table: table.clone(),
                chain: ins.chain_name.clone(),
                handle: None,
                rule: rule.clone(),
            }),
            _ => None,
        })
        .collect();
    let mut ipt_insertions = Vec::new();
    for ins in &plan.insertions {
        if let (Owner::Iptables { variant, v6, table }, RuleSpec::Iptables(specs)) = (&ins.owner, &ins.rule) {
            for spec in specs {
                ipt_insertions.push(IptInsertion {
                    variant: (*variant).into(),
                    v6: *v6,
                    table: table.clone(),
                    chain: ins.chain_name.clone(),
                    spec: spec.clone(),
                });
            }
        }
    }
    let undo = PolicyUndo {
        tag: tag.as_str().to_string(),
        backend,
        genid_before: snap.genid,
        genid_after: None,
        table: (table.is_some() || delete_table).then(|| TableBefore { text: snap.table_text.clone() }),
        nft_insertions,
        ipt_insertions,
        raw: raw_before,
        sysctls: Vec::new(),
        removed_previous: removed,
        warnings: Vec::new(),
        ipt_nft_handles: Vec::new(),
    };
    // The keys this transaction writes: the ones its undo record (and so the listing after
    // apply) will name, so that `show` compares like with like.
    let mut keys: Vec<SysctlKey> = sysctls
        .iter()
        .filter(|c| c.skipped.is_none() && !c.unchanged && c.old.is_some())
        .map(|c| c.key.clone())
        .collect();
    keys.sort();
    keys.dedup();
    drop(lap);
    let scope_rules: Vec<ScopedChain> = scope_chains(&undo)
        .into_iter()
        .map(|(f, t, c)| ((f.to_string(), t.to_string(), c.to_string()), chain_rules_in(&snap.live.nft, f, t, c)))
        .collect();
    let before = scope_listing_at_snapshot(&undo, &keys, &snap, &scope_rules)?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(Prepared {
        request: req.clone(),
        backend,
        live: snap.live,
        plan,
        sysctls,
        findings,
        genid: snap.genid,
        before,
        nft_script,
        ipt_filter,
        ipt_raw,
        flush,
        warnings,
        table,
        delete_table,
        dumps,
        undo,
        scope_keys: keys,
        scope_table_text: snap.table_text,
        scope_rules,
        nft_rollback_checked: false,
    })
}

/// Asks the kernel about everything [`prepare_with`] built, changing nothing: the nft batch
/// [`apply`] will send (ctguard's table, the previous accepts' removal, the insertions) sent
/// without BATCH_END ([`check_batch`]: processed, validated, aborted), and a scratch namespace
/// for every iptables document, on top of what it refers to in the dump it applies to
/// ([`ipt::scratch_base`]). Exit 3 when the kernel refuses.
pub fn kernel_check(p: &Prepared) -> Result<(), PolicyTxnError> {
    kernel_check_covering_rollback(p).map(|_| ())
}

/// [`kernel_check`]; when the nft rollback of `p` only deletes (`!`[`needs_nft_script`]), the
/// check batch carries, after the apply's messages, the deletes that rollback will send —
/// `table inet ctguard` declared and deleted, each inserted rule deleted by its batch-local id
/// ([`BatchBuilder::delete_inserted_rule`]) — so one kernel check (one abort: each costs the
/// kernel an RCU grace period) judges both. Returns true when it did.
///
/// What that proves: the deletes are accepted on the state the apply batch produces from the
/// state checked. [`apply`]'s commit carries the snapshot's generation id, so when it commits
/// (with nothing of ctguard's own committed before it) that checked state is the one it
/// applied to; [`check_rollback`] then skips its own nft check only while the generation id
/// is still the one this commit produced ([`commit_proof`]).
fn kernel_check_covering_rollback(p: &Prepared) -> Result<bool, PolicyTxnError> {
    let _lap = crate::timing::Lap::start("prepare: kernel check");
    let mut covered = false;
    if let Some(mut b) = batch_builder(p, None).map_err(PolicyTxnError::Batch)? {
        if !needs_nft_script(&p.undo) {
            append_rollback_deletes(&mut b, &p.undo).map_err(PolicyTxnError::Batch)?;
            covered = true;
        }
        check_batch(&b.finish_check()).map_err(PolicyTxnError::NftBatchCheck)?;
    }
    let docs: Vec<&IptDoc> = p.ipt_filter.iter().chain(p.ipt_raw.iter()).collect();
    let live = |v: IptVariant, v6: bool| Ok(dump_of(&p.live, v, v6).map(|d| d.text.clone()).unwrap_or_default());
    ipt_rollback_proof::forget();
    match rollback_after_simulated_apply(p) {
        Some((rollback, after)) => {
            // The rollback right after the apply's documents, in the same scratch run.
            scratch_check_docs(&docs, Some((&rollback, &p.undo)), live)?;
            ipt_rollback_proof::keep(&p.undo, &after);
        }
        None => scratch_check_docs(&docs, None, live)?,
    }
    Ok(covered)
}

/// The iptables rollback documents of `p` as [`check_rollback`] will build them right after
/// [`apply`], from the saves apply will leave ([`ipt_sim::after_restore`] of the snapshot's);
/// with those saves per variant and family. `None` when there is nothing iptables to undo,
/// when the rollback puts previous rules back (their places are computed on the live chain),
/// or when a save after apply is not modelled.
#[allow(clippy::type_complexity)]
fn rollback_after_simulated_apply(p: &Prepared) -> Option<(RollbackDocs, BTreeMap<(Variant, bool), String>)> {
    let docs: Vec<&IptDoc> = p.ipt_filter.iter().chain(p.ipt_raw.iter()).collect();
    if docs.is_empty() || p.undo.removed_previous.iter().any(|r| matches!(r, Removed::Iptables { .. })) {
        return None;
    }
    let mut after: BTreeMap<(Variant, bool), String> = BTreeMap::new();
    for d in &docs {
        let k = (d.variant, d.v6);
        let before = match after.remove(&k) {
            Some(t) => t,
            None => dump_of(&p.live, d.variant.into(), d.v6)?.text.clone(),
        };
        after.insert(k, ipt_sim::after_restore(&before, &d.text)?);
    }
    let rollback = rollback_ipt_docs_from(&p.undo, |v, v6| match after.get(&(v, v6)) {
        Some(t) => Ok(t.clone()),
        None => Ok(dump_of(&p.live, v.into(), v6).map(|d| d.text.clone()).unwrap_or_default()),
    })
    .ok()?;
    Some((rollback, after))
}

/// Appends to `b` (an apply batch, for a check) the nft deletes of the rollback of `u` as
/// [`nft_delete_batch`] would send them after the commit: `table inet ctguard` declared and
/// deleted when `u` replaces it, then the rules `b` inserted with `u`'s tag outside that table,
/// by batch-local id instead of the handles they get at commit. Only for a rollback that does
/// not put anything back ([`needs_nft_script`] false).
fn append_rollback_deletes(b: &mut BatchBuilder, u: &PolicyUndo) -> Result<(), BatchError> {
    if u.table.is_some() {
        b.add_table(TABLE_NAME)?;
        b.delete_table(TABLE_NAME)?;
    }
    let ours: Vec<InsertedRule> = b
        .inserted()
        .iter()
        .filter(|r| r.comment == u.tag && !(r.family == "inet" && r.table == TABLE_NAME))
        .cloned()
        .collect();
    for r in &ours {
        b.delete_inserted_rule(r)?;
    }
    Ok(())
}

/// Loads each variant × family's documents (concatenated in the order given) into a scratch
/// namespace on top of `live(variant, v6)` and the host's ipsets, then the rollback `rollback`
/// (its documents, and the transaction they undo) right after them: the kernel's verdict on
/// them, changing nothing in the target. Exit 3 naming the variant and family when it refuses.
///
/// A rollback iptables-nft will run as one nf_tables batch ([`ipt_nft_takes`]) is checked as
/// that batch: built and sent, in the scratch namespace, exactly as the rollback builds and
/// sends it on the target — what runs is what was checked — on a socket whose close does not
/// wait for the batch's deferred destruction, as a restore's exit does (an RCU grace period
/// per deleting commit). Any other rollback document goes through the restore tool after the
/// others.
fn scratch_check_docs(
    docs: &[&IptDoc],
    rollback: Option<(&RollbackDocs, &PolicyUndo)>,
    live: impl Fn(IptVariant, bool) -> Result<String, PolicyTxnError>,
) -> Result<(), PolicyTxnError> {
    let _lap = crate::timing::Lap::start("scratch check");
    SCRATCH_CHECKS.with(|n| n.set(n.get() + 1));
    let takes = rollback.and_then(|(d, u)| ipt_nft_takes(u, d));
    let cleanups = rollback.map(|(_, u)| ipt_nft_undo::RawCleanup::of(&u.raw)).unwrap_or_default();
    // What each check loads, read here (the saves and ipsets are the target's: this thread's):
    // (variant, IPv6, base, the documents, the rollback's documents, the rollback batch's takes).
    type Job = (IptVariant, bool, String, String, String, Option<Vec<ipt_nft_undo::TableTakes>>);
    let mut jobs: Vec<Job> = Vec::new();
    for v in IptVariant::ALL {
        for v6 in [false, true] {
            let of = |d: &IptDoc| IptVariant::from(d.variant) == v && d.v6 == v6;
            let doc: String = docs.iter().filter(|d| of(d)).map(|d| d.text.as_str()).collect();
            let back: String = rollback
                .map(|(d, _)| d.raw.iter().chain(&d.filter).filter(|d| of(d)).map(|d| d.text.as_str()).collect())
                .unwrap_or_default();
            if doc.is_empty() && back.is_empty() {
                continue;
            }
            let live_text = live(v, v6)?;
            // Only what the documents refer to, not the whole save (ipt::scratch_base); its
            // renumbering keeps one line per line, so the rollback's part is the tail.
            let (base, all) = ipt::scratch_base(&live_text, &format!("{doc}{back}"));
            let base = if v == IptVariant::Nft { ipt::without_builtin_policies(&base) } else { base };
            let head = doc.lines().count();
            let (mut doc, mut back) = (String::new(), String::new());
            for (i, line) in all.lines().enumerate() {
                let to = if i < head { &mut doc } else { &mut back };
                to.push_str(line);
                to.push('\n');
            }
            let family_takes = takes
                .as_ref()
                .filter(|_| v == IptVariant::Nft)
                .map(|t| t.iter().filter(|b| b.v6 == v6).cloned().collect::<Vec<_>>());
            tracing::debug!(
                variant = v.as_str(),
                v6,
                live_lines = live_text.lines().count(),
                base_lines = base.lines().count(),
                rollback_batch = family_takes.is_some(),
                "scratch check"
            );
            jobs.push((v, v6, base, doc, back, family_takes));
        }
    }
    let ipsets = if jobs.iter().any(|(_, _, b, d, r, _)| [b, d, r].iter().any(|t| t.contains("--match-set"))) {
        ipt_backend::ipset_save().ok()
    } else {
        None
    };
    // Each in a scratch namespace of its own, all at once (each takes tens of milliseconds of
    // iptables-restore, mostly waiting on the kernel).
    let wait = crate::backend::exec::xtables_wait_secs();
    let cleanups = &cleanups;
    let batches = std::sync::atomic::AtomicUsize::new(0);
    let batches = &batches;
    let results: Vec<Result<(), PolicyTxnError>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(v, v6, base, doc, back, takes)| {
                let sets = ipsets.as_deref();
                s.spawn(move || {
                    crate::backend::exec::with_xtables_wait(wait, || match takes {
                        Some(takes) => {
                            let cleanups: Vec<ipt_nft_undo::RawCleanup> =
                                cleanups.iter().filter(|c| c.v6 == *v6).cloned().collect();
                            let then = || match ipt_nft_batch_attempt(takes, &cleanups, &[], false)? {
                                BatchAttempt::Done => {
                                    batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    Ok(())
                                }
                                BatchAttempt::Raced => Err("the scratch namespace changed under the check".to_string()),
                                // Not one batch here: the documents, as the rollback would then run them.
                                BatchAttempt::NotExpressible => {
                                    ipt_backend::restore(*v, family(*v6), back, true).map_err(|e| chain_text(&e))
                                }
                            };
                            ipt_backend::scratch_check_then(
                                *v,
                                family(*v6),
                                base,
                                sets,
                                doc,
                                "the rollback's batch",
                                then,
                            )
                        }
                        None => ipt_backend::scratch_check(*v, family(*v6), base, sets, &format!("{doc}{back}")),
                    })
                    .map_err(|source| PolicyTxnError::IptCheck {
                        variant: v.as_str(),
                        family: family(*v6).tool_prefix(),
                        source: Box::new(source),
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Err(PolicyTxnError::ScratchPanicked))).collect()
    });
    SCRATCH_ROLLBACK_BATCHES.with(|n| n.set(n.get() + batches.load(std::sync::atomic::Ordering::Relaxed)));
    results.into_iter().collect()
}

/// The batch of [`apply`]: previous accept rules deleted, the table replaced, the accept rules
/// inserted, carrying `genid`. `None` when there is nothing for nft to do.
fn build_batch(p: &Prepared, genid: u32) -> Result<Option<BatchBuffer>, BatchError> {
    Ok(batch_builder(p, Some(genid))?.map(BatchBuilder::finish))
}

/// The messages of [`build_batch`], unfinished: [`kernel_check`] sends them as a check batch
/// (no BATCH_END), [`apply`] as the commit. `None` when there is nothing for nft to do.
fn batch_builder(p: &Prepared, genid: Option<u32>) -> Result<Option<BatchBuilder>, BatchError> {
    let mut b = BatchBuilder::new(genid);
    for r in &p.undo.removed_previous {
        if let Removed::Nft { family, table, chain, handle, text, .. } = r {
            b.delete_rule(
                family,
                table,
                chain,
                *handle,
                format!("delete rule {family} {table} {chain} handle {handle} ({text})"),
            )?;
        }
    }
    if let Some(t) = &p.table {
        if p.live.nft.has_table("inet", TABLE_NAME) {
            b.replace_table(t)?;
        } else {
            // Absent at the snapshot, whose generation id the commit carries: created, not
            // replaced (nothing for nf_tables to destroy after the commit).
            b.create_table(t)?;
        }
    }
    if p.delete_table {
        b.delete_table(TABLE_NAME)?;
    }
    // The kernel echoes each inserted rule after the commit, with its handle.
    b.echo_inserts(true);
    for ins in &p.plan.insertions {
        let (Owner::Nft { family, table }, RuleSpec::Nft(text)) = (&ins.owner, &ins.rule) else { continue };
        let entry = &ins.narrowed;
        let at = match &ins.position {
            Position::Before { handle: Some(h), .. } => RulePosition::Before(*h),
            _ => RulePosition::Append,
        };
        accept::add_accept_rule(
            &mut b,
            &accept::AcceptSpec {
                family,
                table,
                chain: &ins.chain_name,
                at,
                entry,
                proto: ins.proto,
                dir: ins.direction,
                v6: ins.v6,
                tag: &p.request.tag,
                text,
                extra: &ins.extra,
            },
        )?;
    }
    Ok((!b.is_empty()).then_some(b))
}

/// What another writer changed since `before` (the nft ruleset ctguard read, [`ruleset_text`]): tables added and
/// removed, else the first changed lines of a fresh listing (failure path only). Read-only.
fn foreign_change_summary(before: &str) -> String {
    let now = live_backend::read_nft().map(|r| ruleset_text(&r)).unwrap_or_default();
    let (then, now) = (tables_of(before), tables_of(&now));
    let names = |it: Vec<&String>| it.into_iter().map(String::as_str).collect::<Vec<_>>().join(", ");
    let added: Vec<&String> = now.keys().filter(|k| !then.contains_key(*k)).collect();
    let removed: Vec<&String> = then.keys().filter(|k| !now.contains_key(*k)).collect();
    let changed: Vec<&String> =
        now.iter().filter(|(k, v)| then.get(*k).is_some_and(|o| o != *v)).map(|(k, _)| k).collect();
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("table(s) added by another writer: {}", names(added)));
    }
    if !removed.is_empty() {
        parts.push(format!("table(s) removed: {}", names(removed)));
    }
    if !changed.is_empty() {
        parts.push(format!("table(s) changed by another writer: {}", names(changed)));
    }
    if parts.is_empty() {
        "another writer changed the ruleset (its listing reads the same now)".into()
    } else {
        parts.join("; ")
    }
}

/// An nft listing split by table: `"FAMILY NAME"` → its lines (counters zeroed).
fn tables_of(listing: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in listing.lines() {
        if let Some(t) = line.strip_prefix("table ") {
            let name = t.trim_end_matches('{').trim().to_string();
            out.insert(name.clone(), Vec::new());
            current = Some(name);
        } else if let Some(c) = &current {
            if let Some(v) = out.get_mut(c) {
                v.push(zero_nft_counters(line));
            }
        }
    }
    out
}

/// Undoes `undo` after a failed step and builds the error to return.
fn compensate(undo: &PolicyUndo, step: &str, source: Box<dyn StdError + Send + Sync>) -> PolicyTxnError {
    tracing::warn!("{step} failed ({source}); rolling back what was applied");
    match rollback(undo) {
        Ok(_) => PolicyTxnError::ApplyFailed { step: step.to_string(), source },
        Err(e) => PolicyTxnError::ApplyAndRollbackFailed { step: step.to_string(), rollback: e.to_string(), source },
    }
}

/// Applies `p`: (1) the iptables filter insertions (the previous transaction's rules removed in
/// the same table commit), (2) one netlink batch carrying the generation id of the snapshot
/// (re-read after ctguard's own iptables-nft step) with the nft rule deletions, the table and
/// the nft accept insertions, (3) ctguard's iptables raw chains, (4) the sysctls, (5)
/// `flush_existing`. Returns the undo record with the inserted rules' handles as the kernel
/// echoed them after the commit (`NLM_F_ECHO`; a full `nft -a` listing only if one is missing).
///
/// Guarantees: refuses with nothing applied when the ruleset changed since [`prepare`]
/// (generation id, or an iptables save that differs: exit 3). A step that fails undoes every
/// earlier step (exit 3, [`PolicyTxnError::ApplyFailed`]); if that undo fails too, exit 7.
/// At no point is a flow notracked without its accept rules in place. A failed flush is a
/// warning in the record, not an error.
pub fn apply(p: &Prepared) -> Result<PolicyUndo, PolicyTxnError> {
    let _lap = crate::timing::Lap::start("apply");
    ipt_backend::share_saves(false);
    commit_proof::keep(&p.undo, None, false, false);
    // Nothing changed since the snapshot?
    let g = get_genid().map_err(PolicyTxnError::Genid)?;
    if g != p.genid {
        return Err(PolicyTxnError::Stale(format!(
            "nf_tables generation {} is now {g}: {}",
            p.genid,
            foreign_change_summary(&ruleset_text(&p.live.nft))
        )));
    }
    // iptables-nft's tables are nf_tables tables: the generation id, unchanged since the
    // snapshot that read their dumps (above), proves them unchanged. Only legacy is re-read,
    // both families at once.
    let legacy: Vec<&(Variant, bool, String)> = p.dumps.iter().filter(|(v, _, _)| *v != Variant::Nft).collect();
    let which: Vec<(IptVariant, IpFamily)> = legacy.iter().map(|(v, v6, _)| ((*v).into(), family(*v6))).collect();
    for ((v, v6, text), now) in legacy.iter().zip(ipt_backend::saves_at_once(&which)) {
        let now = now.map_err(|e| PolicyTxnError::Iptables(Box::new(e)))?;
        if ipt::normalize_save(&now) != *text {
            return Err(PolicyTxnError::Stale(format!("{} output differs", IptVariant::from(*v).tool(*v6, "-save"))));
        }
    }
    let mut undo = p.undo.clone();
    // What a failed step must undo: only the steps already done (the table and the raw chains
    // are added as their steps succeed; rules found by tag are simply not found before).
    let mut done = p.undo.clone();
    done.table = None;
    done.raw.clear();

    // (1) iptables filter insertions. When nft has nothing to do between them, each family's
    // filter and raw documents go in one restore, filter first (a restore commits its tables in
    // order, so no packet is ever notracked without its accept): half the tool runs.
    // iptables-nft's insertions are announced by the kernel with their handles: kept as the
    // rollback's hints (`tagged_rules_announced`).
    let merged = (!nft_has_work(p)).then(|| concat_per_family(&p.ipt_filter, &p.ipt_raw));
    if merged.is_some() {
        // The raw chains may be created by these runs: a failure undoes them too.
        done.raw = undo.raw.clone();
    }
    let monitor = p.ipt_filter.iter().any(|d| d.variant == Variant::Nft).then(NftMonitor::open).and_then(Result::ok);
    let mut own_commits: u32 = 0;
    for doc in merged.as_deref().unwrap_or(&p.ipt_filter) {
        let v = IptVariant::from(doc.variant);
        if let Err(e) = ipt_backend::restore(v, family(doc.v6), &doc.text, true) {
            let what = if merged.is_some() { "filter insertions, then raw chains" } else { "filter insertions" };
            return Err(compensate(&done, &format!("{} ({what})", v.tool(doc.v6, "-restore")), boxed(e)));
        }
        if v == IptVariant::Nft {
            own_commits += table_sections(&doc.text);
        }
    }

    if let Some(m) = monitor {
        undo.ipt_nft_handles = tagged_rules_announced(&m, &undo);
    }

    // (2) the nft batch, carrying the generation id of the snapshot, moved only by ctguard's
    // own iptables-nft commits. Never re-based on another writer's change: a generation id
    // that moved further means the plan may no longer hold, so what this attempt applied is
    // undone and the caller re-reads (retryable).
    crate::fault::foreign_change("apply:foreign-change");
    let mut genid = p.genid;
    if own_commits > 0 {
        genid = match get_genid() {
            Ok(g) => g,
            Err(e) => return Err(compensate(&done, "reading the generation id", boxed(e))),
        };
        let moved = genid.wrapping_sub(p.genid);
        if moved > own_commits {
            let conflict = PolicyTxnError::ForeignChange {
                during: "between ctguard's read and its nft batch".into(),
                moved,
                own: own_commits,
            };
            tracing::warn!("{conflict}");
            return Err(match rollback(&done) {
                Ok(_) => conflict,
                Err(r) => PolicyTxnError::ApplyAndRollbackFailed {
                    step: "the iptables-nft step".into(),
                    rollback: r.to_string(),
                    source: boxed(conflict),
                },
            });
        }
        if moved < own_commits {
            let w = format!(
                "the nf_tables generation moved by {moved} during ctguard's iptables-nft step ({own_commits} expected)"
            );
            tracing::warn!("{w}");
            undo.warnings.push(w);
        }
    }
    let batch = match build_batch(p, genid) {
        Ok(b) => b,
        Err(e) => return Err(compensate(&done, "encoding the nft batch", boxed(e))),
    };
    // Every commit ctguard's own steps make, while each is known to make exactly one: with
    // the generation id moved by exactly that many at the end, no other writer committed
    // (see `seed_proven_saves`).
    let mut commits_counted = Some(own_commits + u32::from(batch.is_some()));
    if let Some(batch) = batch {
        let lap = crate::timing::Lap::start("apply: the nft commit");
        let echoed = send_batch_echoed(&batch);
        drop(lap);
        let echoed = match echoed {
            Ok(r) => r,
            Err(e) => {
                return Err(match e {
                    NetlinkError::GenerationChanged { .. } => match rollback(&done) {
                        Ok(_) => PolicyTxnError::GenerationChanged { genid, source: e },
                        Err(r) => PolicyTxnError::ApplyAndRollbackFailed {
                            step: "the nft batch".into(),
                            rollback: r.to_string(),
                            source: boxed(e),
                        },
                    },
                    other => compensate(&done, "the nft batch", boxed(other)),
                })
            }
        };
        done.table = undo.table.clone();
        let mut handles_echoed = true;
        if !undo.nft_insertions.is_empty() {
            // The handles the kernel echoed; a full listing only when some did not come back.
            let listed: Vec<nft_text::ListedRule> = echoed.into_iter().map(listed_of).collect();
            fill_handles(&mut undo, &listed);
            if undo.nft_insertions.iter().any(|i| i.handle.is_none()) {
                handles_echoed = false;
                tracing::debug!("not every inserted rule was echoed; reading the handles back with nft");
                for ins in undo.nft_insertions.iter_mut() {
                    ins.handle = None;
                }
                match read_listed() {
                    Ok(listed) => fill_handles(&mut undo, &listed),
                    Err(e) => undo.warnings.push(format!("reading the inserted rules' handles back failed: {e}")),
                }
            }
        }
        // Committed on the snapshot's generation, nothing of ctguard's before it: what the
        // check judged and the handles the kernel echoed hold until the next commit.
        if own_commits == 0 {
            commit_proof::keep(&undo, Some(genid.wrapping_add(1)), p.nft_rollback_checked, handles_echoed);
        }
    }

    // (3) ctguard's raw chains (with the filter documents above when merged).
    let raw_docs: &[IptDoc] = if merged.is_some() { &[] } else { &p.ipt_raw };
    for (i, doc) in raw_docs.iter().enumerate() {
        let v = IptVariant::from(doc.variant);
        if let Some(r) = undo.raw.get(i) {
            done.raw.push(r.clone());
        }
        if let Err(e) = ipt_backend::restore(v, family(doc.v6), &doc.text, true) {
            return Err(compensate(&done, &format!("{} (raw chains)", v.tool(doc.v6, "-restore")), boxed(e)));
        }
        if v == IptVariant::Nft {
            commits_counted = commits_counted.map(|n| n + table_sections(&doc.text));
        }
    }
    crate::fault::foreign_iptables_change("apply:after-iptables");
    // Nothing to notrack any more (`apply --remove`): the raw tables iptables-nft created for
    // ctguard's chains go too when nothing else uses them (iptables-nft recreates them on use).
    if p.request.policy.notrack.is_empty() {
        let pretend: Vec<RawBefore> = undo
            .raw
            .iter()
            .filter(|r| r.variant == Variant::Nft)
            .map(|r| RawBefore { nft_table_existed: false, ..r.clone() })
            .collect();
        // It may commit or not: the count no longer proves anything.
        commits_counted = None;
        let probe = PolicyUndo { raw: pretend, ..PolicyUndo::empty(&undo.tag) };
        if let Err(e) = cleanup_nft_raw(&probe) {
            tracing::warn!("removing the empty iptables-nft raw tables: {}", chain_text(&e));
        }
    }

    // (4) sysctls.
    for w in p.sysctl_writes() {
        let key = match SysctlKey::parse(&w.key) {
            Ok(k) => k,
            Err(e) => return Err(compensate(&done, "sysctl", boxed(PolicyTxnError::BadUndo(e)))),
        };
        done.sysctls.push(w.clone());
        if let Err(e) = crate::sysctl::write(&key, w.new) {
            return Err(compensate(&done, &format!("writing sysctl {key}"), boxed(e)));
        }
        undo.sysctls.push(w);
    }

    // (5) flush_existing.
    if !p.flush.is_empty() {
        match Tool::find("conntrack") {
            Ok(ct) => {
                for args in &p.flush {
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    match ct.output(&a, None) {
                        Ok(o) if o.status.success() => {}
                        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("0 flow entries") => {}
                        Ok(o) => undo.warnings.push(format!(
                            "conntrack {} failed ({}): {}",
                            a.join(" "),
                            o.status,
                            crate::backend::exec::one_line(&String::from_utf8_lossy(&o.stderr))
                        )),
                        Err(e) => undo.warnings.push(format!("conntrack {}: {e}", a.join(" "))),
                    }
                }
            }
            Err(e) => undo.warnings.push(format!("flush_existing skipped: {e}")),
        }
    }
    undo.genid_after = get_genid().ok();
    if let (Some(n), Some(g)) = (commits_counted, undo.genid_after) {
        if g.wrapping_sub(p.genid) == n {
            seed_proven_saves(p);
        }
    }
    for w in &undo.warnings {
        tracing::warn!("{w}");
    }
    Ok(undo)
}

/// The table sections of an iptables-restore document: iptables-nft-restore commits each in
/// a transaction of its own.
fn table_sections(doc: &str) -> u32 {
    doc.lines().filter(|l| l.starts_with('*')).count() as u32
}

/// After an [`apply`] that the generation id proves was the only writer since the snapshot
/// (it moved by exactly ctguard's own commits), the iptables-nft saves of the families apply
/// wrote to are the snapshot's with apply's documents carried out ([`ipt_sim::after_restore`]):
/// they are handed to the save sharing of [`after_listing`] and [`check_rollback`] instead of
/// two more reads of the tables (a second each at 100k rules). A family whose documents use
/// something the simulation does not model is simply read again. Debug builds read it anyway
/// and panic on any difference (every kernel test that applies through iptables-nft checks
/// the simulation so).
fn seed_proven_saves(p: &Prepared) {
    for v6 in [false, true] {
        let docs: Vec<&IptDoc> =
            p.ipt_filter.iter().chain(p.ipt_raw.iter()).filter(|d| d.variant == Variant::Nft && d.v6 == v6).collect();
        let Some(before) = dump_of(&p.live, IptVariant::Nft, v6).filter(|_| !docs.is_empty()) else { continue };
        let mut text = Some(before.text.clone());
        for d in docs {
            text = text.and_then(|t| ipt_sim::after_restore(&t, &d.text));
        }
        match text {
            Some(t) => ipt_backend::seed_save(IptVariant::Nft, family(v6), &t),
            None => tracing::debug!("the iptables-nft save after apply is not modelled; it is read again"),
        }
    }
}

fn read_listed() -> Result<Vec<nft_text::ListedRule>, PolicyTxnError> {
    let Ok(nft) = Tool::find("nft") else { return Ok(Vec::new()) };
    let text = nft
        .run(&["-a", "list", "ruleset"], None)
        .map_err(|source| PolicyTxnError::Exec { what: "nft -a list ruleset".into(), source })?;
    Ok(nft_text::rules(&text))
}

/// A rule read over netlink as a listed rule (no text: netlink gives expressions, not nft's
/// text; only family, table, chain, handle and comment are used from it).
fn listed_of(r: RuleInfo) -> nft_text::ListedRule {
    nft_text::ListedRule {
        family: r.family,
        table: r.table,
        chain: r.chain,
        handle: r.handle,
        text: String::new(),
        comment: r.comment,
    }
}

/// The chains outside `table inet ctguard` that `u` inserted into: (family, table, chain).
fn insertion_chains(u: &PolicyUndo) -> Vec<(&str, &str, &str)> {
    let mut ours: Vec<(&str, &str, &str)> = u
        .nft_insertions
        .iter()
        .map(|i| (i.family.as_str(), i.table.as_str(), i.chain.as_str()))
        .filter(|(f, t, _)| !(*f == "inet" && *t == TABLE_NAME))
        .collect();
    ours.sort_unstable();
    ours.dedup();
    ours
}

/// The rules a rollback of `u` deletes from the chains `u` inserted into, read over netlink
/// (no `nft` listing): per chain, when apply recorded every insertion's handle, the rules with
/// those handles (`GETRULE` by handle); when one is missing, gone or no longer carries `u`'s tag
/// (the handle is only a hint: a recreated table reuses handles), every rule of the chain (a
/// `GETRULE` dump filtered to that chain in the kernel), among which the caller finds the tag.
fn read_insertion_chains(u: &PolicyUndo) -> Result<Vec<nft_text::ListedRule>, PolicyTxnError> {
    let mut out = Vec::new();
    for (f, t, c) in insertion_chains(u) {
        let err = |source| PolicyTxnError::RuleDump { chain: format!("{f} {t} {c}"), source };
        let hints: Vec<Option<u64>> = u
            .nft_insertions
            .iter()
            .filter(|i| i.family == f && i.table == t && i.chain == c)
            .map(|i| i.handle)
            .collect();
        let mut by_handle = Vec::new();
        for h in hints.iter() {
            let Some(h) = h else { break };
            match get_rule(f, t, c, *h).map_err(err)? {
                Some(r) if r.comment.as_deref() == Some(u.tag.as_str()) && r.chain == c => by_handle.push(r),
                _ => break,
            }
        }
        if by_handle.len() == hints.len() {
            out.extend(by_handle.into_iter().map(listed_of));
        } else {
            out.extend(dump_chain_rules(f, t, c).map_err(err)?.into_iter().map(listed_of));
        }
    }
    Ok(out)
}

/// The rules `u` inserted outside `table inet ctguard`, as listed rules carrying `u`'s tag,
/// from the handles apply recorded (those the kernel echoed): what [`read_insertion_chains`]
/// would find while nothing has committed since that commit. Pure.
fn listed_from_echo(u: &PolicyUndo) -> Vec<nft_text::ListedRule> {
    u.nft_insertions
        .iter()
        .filter(|i| !(i.family == "inet" && i.table == TABLE_NAME))
        .filter_map(|i| {
            i.handle.map(|handle| nft_text::ListedRule {
                family: i.family.clone(),
                table: i.table.clone(),
                chain: i.chain.clone(),
                handle,
                text: String::new(),
                comment: Some(u.tag.clone()),
            })
        })
        .collect()
}

/// Handles of the inserted rules, matched by chain and tag in listing order.
fn fill_handles(undo: &mut PolicyUndo, listed: &[nft_text::ListedRule]) {
    let tag = undo.tag.clone();
    let mut used: Vec<u64> = Vec::new();
    for ins in undo.nft_insertions.iter_mut() {
        let candidates = |r: &&nft_text::ListedRule| {
            r.family == ins.family
                && r.table == ins.table
                && r.chain == ins.chain
                && r.comment.as_deref() == Some(tag.as_str())
                && !used.contains(&r.handle)
        };
        // The same text first; nft may print a rule differently from how it was written.
        let found =
            listed.iter().filter(candidates).find(|r| r.text == ins.rule).or_else(|| listed.iter().find(candidates));
        if let Some(r) = found {
            used.push(r.handle);
            ins.handle = Some(r.handle);
        }
    }
}

/// What a rollback did besides succeeding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollbackReport {
    /// Warnings (e.g. a conntrack max restored below the current count, generation drift).
    pub warnings: Vec<String>,
}

/// The rollback documents [`check_rollback`] built and checked, kept on this thread for the
/// rollback of the same transaction while they are provably current: only iptables-nft ones
/// (its tables are nf_tables tables), in the same namespace, at the same nf_tables generation
/// id — nothing committed since they were built from a save, so a fresh save would give the
/// same documents. Spares the rollback a whole save and parse.
mod checked_docs {
    use std::cell::RefCell;

    use super::{RollbackDocs, Variant};
    use crate::backend::policy_txn::PolicyUndo;

    /// (tag, namespace device, namespace inode, generation id).
    type Key = (String, u64, u64, u32);

    thread_local! {
        static KEPT: RefCell<Option<(Key, RollbackDocs)>> = const { RefCell::new(None) };
    }

    /// `u`'s key now: its tag, this thread's namespace and its generation id.
    pub fn key(u: &PolicyUndo) -> Option<Key> {
        let (dev, ino) = crate::netns::current_id()?;
        let genid = crate::backend::netlink::get_genid().ok()?;
        Some((u.tag.clone(), dev, ino, genid))
    }

    /// Keeps `docs`, built for `u` after `before` was read, when they are iptables-nft only and
    /// nothing committed while they were built (the key is the same now).
    pub fn keep(before: Option<Key>, u: &PolicyUndo, docs: &RollbackDocs) {
        let nft_only = docs.saves.keys().all(|(v, _)| *v == Variant::Nft)
            && docs.raw.iter().chain(docs.filter.iter()).all(|d| d.variant == Variant::Nft);
        // The saves they were built from stay out: a pending transaction must not hold a copy
        // of a 100k-rule table (the rollback needs the documents only).
        let kept = match before {
            Some(k) if nft_only && key(u).as_ref() == Some(&k) => Some((
                k,
                RollbackDocs { raw: docs.raw.clone(), filter: docs.filter.clone(), saves: Default::default() },
            )),
            _ => None,
        };
        KEPT.with(|d| *d.borrow_mut() = kept);
    }

    /// The documents kept for `u`, when nothing committed since; forgets them either way.
    pub fn take(u: &PolicyUndo) -> Option<RollbackDocs> {
        let (k, docs) = KEPT.with(|d| d.borrow_mut().take())?;
        (Some(k) == key(u)).then_some(docs)
    }
}

thread_local! {
    static SCRATCH_CHECKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static SCRATCH_ROLLBACK_BATCHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many iptables-nft rollbacks this thread's scratch checks checked as the one nf_tables
/// batch the rollback sends (one per family). Read-only; for tests.
pub fn scratch_rollback_batches_run() -> usize {
    SCRATCH_ROLLBACK_BATCHES.with(std::cell::Cell::get)
}

/// How many iptables scratch checks (each: scratch namespaces, one restore run per variant and
/// family) this thread has run. Read-only; for tests and timing.
pub fn scratch_checks_run() -> usize {
    SCRATCH_CHECKS.with(std::cell::Cell::get)
}

/// The iptables rollback documents [`kernel_check`] checked in the scratch run of the apply's
/// own, on this thread: the tag, the namespace, and a digest of each save (normalized) they
/// were built from — the saves apply would leave, simulated. [`check_rollback`] skips its
/// scratch check when the documents it builds come from saves with the same digests (for
/// iptables-nft, the simulated saves themselves, proven by the generation id; for legacy, a
/// fresh save that reads the same): the same documents, checked on the same state.
mod ipt_rollback_proof {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::Variant;
    use crate::backend::policy_txn::PolicyUndo;

    type Kept = (String, (u64, u64), BTreeMap<(Variant, bool), u64>);

    thread_local! {
        static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
    }

    fn digest(text: &str) -> u64 {
        let mut h = crate::backend::nft_fingerprint::Fnv1a::new();
        h.eat(crate::render::ipt_edit::normalize_save(text).as_bytes());
        h.0
    }

    /// Keeps what `u`'s checked documents were built from (`after`: the simulated saves).
    pub fn keep(u: &PolicyUndo, after: &BTreeMap<(Variant, bool), String>) {
        let kept = crate::netns::current_id()
            .map(|ns| (u.tag.clone(), ns, after.iter().map(|(k, t)| (*k, digest(t))).collect()));
        KEPT.with(|k| *k.borrow_mut() = kept);
    }

    pub fn forget() {
        KEPT.with(|k| *k.borrow_mut() = None);
    }

    /// True when documents of `u` built from `saves` are the ones checked; forgets either way.
    pub fn take(u: &PolicyUndo, saves: &BTreeMap<(Variant, bool), String>) -> bool {
        let Some((tag, ns, digests)) = KEPT.with(|k| k.borrow_mut().take()) else { return false };
        tag == u.tag
            && crate::netns::current_id() == Some(ns)
            && !saves.is_empty()
            && saves.iter().all(|(k, t)| digests.get(k) == Some(&digest(t)))
    }
}

/// What [`apply`]'s nft commit proved, kept on this thread for [`check_rollback`] and
/// [`rollback`] of the same transaction: the commit carried the snapshot's generation id (with
/// nothing of ctguard's committed before it), so it applied to the state [`prepare`] read and
/// checked. While the generation id is still the one that commit produced (nothing committed
/// since), in the same namespace, for the same tag: the rollback's deletes were kernel-checked
/// when the check batch carried them, and the handles the kernel echoed are the inserted rules'
/// own (handles are reused only when a table is recreated: a commit). Lost with the thread:
/// after an agent restart the rollback reads and checks everything again.
mod commit_proof {
    use std::cell::RefCell;

    use crate::backend::policy_txn::PolicyUndo;

    /// What a commit proved (see the module).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Proof {
        tag: String,
        netns: (u64, u64),
        /// The generation id the commit produced.
        genid: u32,
        /// The check batch before the commit carried the rollback's deletes.
        pub rollback_checked: bool,
        /// Every inserted rule's handle came back in the commit's echo.
        pub handles_echoed: bool,
    }

    thread_local! {
        static KEPT: RefCell<Option<Proof>> = const { RefCell::new(None) };
    }

    /// Records what the commit that produced generation `genid_after` proved for `u`; `None`
    /// forgets any earlier record.
    pub fn keep(u: &PolicyUndo, genid_after: Option<u32>, rollback_checked: bool, handles_echoed: bool) {
        let kept = genid_after.and_then(|genid| {
            crate::netns::current_id().map(|netns| Proof {
                tag: u.tag.clone(),
                netns,
                genid,
                rollback_checked,
                handles_echoed,
            })
        });
        KEPT.with(|k| *k.borrow_mut() = kept);
    }

    /// The proof for `u` when the generation id in this thread's namespace is `genid` and
    /// that is still the one its commit produced. Read-only.
    pub fn at(u: &PolicyUndo, genid: u32) -> Option<Proof> {
        let p = KEPT.with(|k| k.borrow().clone())?;
        (p.tag == u.tag && p.genid == genid && crate::netns::current_id() == Some(p.netns)).then_some(p)
    }

    /// [`at`] the generation id read now.
    pub fn now(u: &PolicyUndo) -> Option<Proof> {
        crate::backend::netlink::get_genid().ok().and_then(|g| at(u, g))
    }
}

/// The documents of a rollback, built from a fresh read.
#[derive(Clone)]
struct RollbackDocs {
    raw: Vec<IptDoc>,
    filter: Vec<IptDoc>,
    /// The saves the documents were built from, per variant and family.
    saves: BTreeMap<(Variant, bool), String>,
}

fn rollback_ipt_docs(u: &PolicyUndo) -> Result<RollbackDocs, PolicyTxnError> {
    let _lap = crate::timing::Lap::start("rollback: iptables documents");
    // Every save the documents need, read side by side.
    let keys = rollback_save_keys(u);
    let which: Vec<(IptVariant, IpFamily)> = keys.iter().map(|(v, v6)| (IptVariant::from(*v), family(*v6))).collect();
    let mut read: BTreeMap<(Variant, bool), Result<String, PolicyTxnError>> = keys
        .iter()
        .copied()
        .zip(
            ipt_backend::saves_at_once(&which)
                .into_iter()
                .map(|r| r.map_err(|e| PolicyTxnError::Iptables(Box::new(e)))),
        )
        .collect();
    let taken = std::cell::RefCell::new(&mut read);
    rollback_ipt_docs_from(u, |v, v6| {
        let kept = taken.borrow_mut().remove(&(v, v6));
        kept.unwrap_or_else(|| {
            ipt_backend::save(IptVariant::from(v), family(v6)).map_err(|e| PolicyTxnError::Iptables(Box::new(e)))
        })
    })
}

/// The (variant, family) of the filter documents of `u`'s rollback: where it inserted or
/// removed rules; sorted, once each.
fn filter_keys(u: &PolicyUndo) -> Vec<(Variant, bool)> {
    let mut keys: Vec<(Variant, bool)> = u.ipt_insertions.iter().map(|i| (i.variant, i.v6)).collect();
    for r in &u.removed_previous {
        if let Removed::Iptables { variant, v6, .. } = r {
            keys.push((*variant, *v6));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The (variant, family) saves [`rollback_ipt_docs_from`] asks for, in its order, once each:
/// those of ctguard's raw chains, then those it inserted into or removed from.
fn rollback_save_keys(u: &PolicyUndo) -> Vec<(Variant, bool)> {
    let mut all: Vec<(Variant, bool)> = Vec::new();
    for k in u.raw.iter().map(|r| (r.variant, r.v6)).chain(filter_keys(u)) {
        if !all.contains(&k) {
            all.push(k);
        }
    }
    all
}

/// [`rollback_ipt_docs`] built from the saves `save` gives per variant and family (pure but
/// for `save`).
fn rollback_ipt_docs_from(
    u: &PolicyUndo,
    save: impl Fn(Variant, bool) -> Result<String, PolicyTxnError>,
) -> Result<RollbackDocs, PolicyTxnError> {
    let keys = filter_keys(u);
    // One save per variant and family, shared by the raw and the filter documents (parsed
    // once, never copied: a 10k-rule dump is big).
    let mut saves: BTreeMap<(Variant, bool), (String, SaveDump)> = BTreeMap::new();
    for k in rollback_save_keys(u) {
        if let std::collections::btree_map::Entry::Vacant(slot) = saves.entry(k) {
            let text = save(k.0, k.1)?;
            // Without rules to put back, only ctguard's own rules and the raw table matter.
            let puts_back = u
                .removed_previous
                .iter()
                .any(|r| matches!(r, Removed::Iptables { variant, v6, .. } if (*variant, *v6) == k));
            let dump = if puts_back {
                parse_dump(&text, k.0.into(), k.1)?
            } else {
                parse_dump(&ipt::reduce_save(&text, u.tag.as_str()), k.0.into(), k.1)?
            };
            slot.insert((text, dump));
        }
    }
    let saved = |variant: Variant, v6: bool| -> &SaveDump { &saves[&(variant, v6)].1 };
    let mut raw = Vec::new();
    for r in &u.raw {
        let dump = saved(r.variant, r.v6);
        let now = ipt::raw_chains(dump);
        if let Some(text) = ipt::raw_restore(&r.before, &now, &r.jumps_added) {
            raw.push(IptDoc { variant: r.variant, v6: r.v6, text });
        }
    }
    let mut filter = Vec::new();
    for (variant, v6) in keys {
        let dump = saved(variant, v6);
        // Chains by table: those of this transaction's rules and of the removed ones.
        let mut chains: Vec<(String, String)> = u
            .ipt_insertions
            .iter()
            .filter(|i| i.variant == variant && i.v6 == v6)
            .map(|i| (i.table.clone(), i.chain.clone()))
            .collect();
        for r in &u.removed_previous {
            if let Removed::Iptables { variant: rv, v6: r6, table, chain, .. } = r {
                if *rv == variant && *r6 == v6 {
                    chains.push((table.clone(), chain.clone()));
                }
            }
        }
        chains.sort();
        chains.dedup();
        let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut sims: BTreeMap<(String, String), ipt::ChainSim> = BTreeMap::new();
        for (table, chain) in &chains {
            for (_, rule) in ipt::tagged(dump, table, chain, &u.tag) {
                tables.entry(table.clone()).or_default().push(ipt::delete_line(rule));
            }
            sims.insert(
                (table.clone(), chain.clone()),
                ipt::ChainSim::new(dump, table, chain, |r| ipt::comment(r).as_deref() == Some(u.tag.as_str())),
            );
        }
        for r in &u.removed_previous {
            let Removed::Iptables { variant: rv, v6: r6, table, chain, line, index, anchor } = r else { continue };
            if *rv != variant || *r6 != v6 || dump.chain(table, chain).is_none() {
                continue;
            }
            let Some(sim) = sims.get_mut(&(table.clone(), chain.clone())) else { continue };
            if sim.contains(line) {
                continue;
            }
            let cmd = sim.insert(chain, line, anchor.as_deref(), *index);
            tables.entry(table.clone()).or_default().push(cmd);
        }
        let mut text = String::new();
        for (table, lines) in tables {
            if lines.is_empty() {
                continue;
            }
            let _ = writeln!(text, "*{table}");
            for l in lines {
                text.push_str(&l);
                text.push('\n');
            }
            text.push_str("COMMIT\n");
        }
        if !text.is_empty() {
            filter.push(IptDoc { variant, v6, text });
        }
    }
    let saves = saves.into_iter().map(|(k, (text, _))| (k, text)).collect();
    Ok(RollbackDocs { raw, filter, saves })
}

/// The nft side of a rollback as one `nft -f` script, from a fresh listing: the previous
/// `table inet ctguard` restored (or the table deleted), with `with_deletes` this
/// transaction's tagged rules deleted by the handles of that listing (only for `nft -c`: the
/// real deletes go in a batch carrying the generation id, [`nft_guarded_deletes`]), the
/// previous transaction's removed rules put back before the rule that followed them. Empty
/// when there is nothing to do.
fn nft_rollback_script(
    u: &PolicyUndo,
    listed: &[nft_text::ListedRule],
    chains: &nft_json::NftRuleset,
    with_deletes: bool,
) -> String {
    let mut s = String::new();
    if let Some(t) = &u.table {
        let _ = writeln!(s, "table inet {TABLE_NAME}\ndelete table inet {TABLE_NAME}");
        if let Some(text) = &t.text {
            s.push_str(text);
            if !text.ends_with('\n') {
                s.push('\n');
            }
        }
    }
    let mut deleted: Vec<u64> = Vec::new();
    for (f, t, c) in &insertion_chains(u) {
        for r in listed.iter().filter(|r| r.family == *f && r.table == *t && r.chain == *c) {
            if r.comment.as_deref() == Some(u.tag.as_str()) {
                if with_deletes {
                    let _ = writeln!(s, "delete rule {f} {t} {c} handle {}", r.handle);
                }
                deleted.push(r.handle);
            }
        }
    }
    for r in &u.removed_previous {
        let Removed::Nft { family, table, chain, text, anchor, .. } = r else { continue };
        let chain_exists = chains.fw.chains.iter().any(|ch| {
            matches!(&ch.owner, Owner::Nft { family: f, table: t } if f == family && t == table) && ch.name == *chain
        });
        if !chain_exists {
            continue;
        }
        let in_chain = |x: &&nft_text::ListedRule| x.family == *family && x.table == *table && x.chain == *chain;
        if listed.iter().filter(in_chain).any(|x| x.text == *text && !deleted.contains(&x.handle)) {
            continue;
        }
        let anchor_ok =
            anchor.filter(|a| listed.iter().filter(in_chain).any(|x| x.handle == *a && !deleted.contains(a)));
        match anchor_ok {
            Some(a) => {
                let _ = writeln!(s, "insert rule {family} {table} {chain} position {a} {text}");
            }
            None => {
                let _ = writeln!(s, "add rule {family} {table} {chain} {text}");
            }
        }
    }
    s
}

/// True when `u` has nft rules of a previous transaction to put back: only then does its
/// rollback need nft's text of the rules (to find them) and the JSON ruleset (their chains
/// must still exist).
fn puts_back_nft(u: &PolicyUndo) -> bool {
    u.removed_previous.iter().any(|r| matches!(r, Removed::Nft { .. }))
}

/// The rules a rollback of `u` must look at, and — only when `u` has removed nft rules of a
/// previous transaction to put back — the parsed JSON ruleset. Without rules to put back, the
/// rules are read over netlink from the chains `u` inserted into only; otherwise with two full
/// listings (`nft -a`, `nft -j`: about 0.4 s each at 10k rules).
fn read_nft_for_rollback_of(
    u: &PolicyUndo,
) -> Result<(Vec<nft_text::ListedRule>, nft_json::NftRuleset), PolicyTxnError> {
    if !puts_back_nft(u) {
        return Ok((read_insertion_chains(u)?, nft_json::NftRuleset::default()));
    }
    read_nft_for_rollback()
}

/// The deletes of a rollback of `u` as one netlink batch carrying `genid` (read before
/// `listed` was): `table inet ctguard` when `delete_table`, and the rules in `listed` tagged
/// with `u`'s tag deleted by handle. `None` when there is nothing to do.
fn nft_delete_batch(
    u: &PolicyUndo,
    listed: &[nft_text::ListedRule],
    genid: Option<u32>,
    delete_table: bool,
) -> Result<Option<BatchBuilder>, BatchError> {
    let mut b = BatchBuilder::new(genid);
    if delete_table {
        // Declare, then delete: deleting a table that is already gone is no error.
        b.add_table(TABLE_NAME)?;
        b.delete_table(TABLE_NAME)?;
    }
    for (f, t, c) in &insertion_chains(u) {
        for r in listed.iter().filter(|r| r.family == *f && r.table == *t && r.chain == *c) {
            if r.comment.as_deref() == Some(u.tag.as_str()) {
                b.delete_rule(f, t, c, r.handle, format!("delete rule {f} {t} {c} handle {} ({})", r.handle, u.tag))?;
            }
        }
    }
    Ok((!b.is_empty()).then_some(b))
}

/// True when the rollback of `u` restores something with `nft -f` (a previous `table inet
/// ctguard`, or previous accept rules to put back) before its guarded deletes.
fn needs_nft_script(u: &PolicyUndo) -> bool {
    puts_back_nft(u) || u.table.as_ref().is_some_and(|t| t.text.is_some())
}

/// Step (a) of the nft rollback: the previous table and the previous rules back, in one `nft
/// -f` ([`nft_rollback_script`] without the deletes by handle). Returns a warning when the
/// generation id moved by more than that transaction.
fn nft_put_back(u: &PolicyUndo) -> Result<Option<String>, String> {
    let g0 = get_genid().ok();
    let (listed, chains) = read_nft_for_rollback_of(u).map_err(|e| chain_text(&e))?;
    let script = nft_rollback_script(u, &listed, &chains, false);
    if script.is_empty() {
        return Ok(None);
    }
    let nft = Tool::find("nft").map_err(|e| e.to_string())?;
    nft.run(&["-f", "-"], Some(script.as_bytes())).map_err(|e| e.to_string())?;
    let moved = get_genid().ok().zip(g0).map(|(b, a)| b.wrapping_sub(a));
    Ok(moved.filter(|m| *m != 1).map(|m| {
        let w = format!("the nf_tables generation moved by {m} around the rollback's nft -f (1 expected): another writer was active");
        tracing::warn!("{w}");
        w
    }))
}

/// Step (b) of the nft rollback: reads the generation id, then the rules tagged with `u`'s tag
/// in the chains it inserted into (over netlink), and deletes them by handle in one batch
/// carrying that generation id (with `table inet ctguard` when no previous table replaces it).
/// [`PolicyTxnError::GenerationChanged`] when the ruleset changed in between: nothing deleted.
fn nft_guarded_deletes(u: &PolicyUndo) -> Result<(), PolicyTxnError> {
    let lap = crate::timing::Lap::start("rollback: read the rules to delete");
    let genid = get_genid().map_err(PolicyTxnError::Genid)?;
    let every_handle = u.nft_insertions.iter().all(|i| i.handle.is_some());
    let listed = match commit_proof::at(u, genid) {
        // Nothing committed since ctguard's own commit: the handles it echoed are the rules'
        // (the batch below carries this generation id, so that still holds when it lands).
        // An undo without them (a failed apply's partial one) reads by tag.
        Some(proof) if proof.handles_echoed && every_handle => listed_from_echo(u),
        _ => read_insertion_chains(u)?,
    };
    drop(lap);
    let _lap = crate::timing::Lap::start("rollback: the delete batch");
    crate::fault::foreign_change("rollback:foreign-change");
    let delete_table = u.table.is_some() && !needs_nft_script(u);
    let Some(batch) = nft_delete_batch(u, &listed, Some(genid), delete_table).map_err(PolicyTxnError::Batch)? else {
        return Ok(());
    };
    let batch = batch.finish();
    send_batch(&batch).map_err(|source| match source {
        NetlinkError::GenerationChanged { .. } => PolicyTxnError::GenerationChanged { genid, source },
        other => PolicyTxnError::RuleDump { chain: "the rollback batch".into(), source: other },
    })
}

fn read_nft_for_rollback() -> Result<(Vec<nft_text::ListedRule>, nft_json::NftRuleset), PolicyTxnError> {
    let Ok(nft) = Tool::find("nft") else { return Ok((Vec::new(), nft_json::NftRuleset::default())) };
    let listed = read_listed()?;
    let json = nft
        .run(&["-j", "list", "ruleset"], None)
        .map_err(|source| PolicyTxnError::Exec { what: "nft -j list ruleset".into(), source })?;
    let parsed = nft_json::parse(&json).map_err(PolicyTxnError::NftJson)?;
    Ok((listed, parsed))
}

/// True when [`check_rollback`] of `u`, called now on this thread, would not send its nft check
/// again: [`prepare`]'s check batch carried the rollback's deletes after the apply's messages,
/// [`apply`] committed on the generation that check judged (nothing of ctguard's committed
/// before it), and the generation id in this namespace is still the one that commit produced.
/// Read-only (one generation id read).
pub fn nft_rollback_already_checked(u: &PolicyUndo) -> bool {
    commit_proof::now(u).is_some_and(|p| p.rollback_checked)
}

/// Kernel-checks the rollback of `u` against the current state: its nft delete batch sent as a
/// check batch (or, when it also puts a previous table or previous rules back, its whole script
/// with `nft -c`), and the iptables documents in scratch namespaces loaded with what they refer
/// to in the current saves. The nft deletes are not sent again when [`prepare`]'s check batch
/// already carried them and nothing committed since [`apply`]'s commit
/// ([`nft_rollback_already_checked`]).
///
/// Guarantees: changes nothing. `Ok` means the rollback built now would be accepted by the
/// kernel; it is rebuilt from a fresh read when it runs.
pub fn check_rollback(u: &PolicyUndo) -> Result<(), PolicyTxnError> {
    let _lap = crate::timing::Lap::start("check rollback");
    let result = check_rollback_shared(u);
    ipt_backend::share_saves(false);
    result
}

fn check_rollback_shared(u: &PolicyUndo) -> Result<(), PolicyTxnError> {
    u.tag()?;
    for s in &u.sysctls {
        let key = SysctlKey::parse(&s.key).map_err(PolicyTxnError::BadUndo)?;
        if !crate::sysctl::writable(&key) {
            return Err(PolicyTxnError::SysctlUnwritable { problems: vec![format!("sysctl.\"{key}\": not writable")] });
        }
    }
    if needs_nft_script(u) {
        // Something to put back with `nft -f` first: the whole script, deletes included.
        let (listed, chains) = read_nft_for_rollback_of(u)?;
        let script = nft_rollback_script(u, &listed, &chains, true);
        if !script.is_empty() {
            tool("nft")?.run(&["-c", "-f", "-"], Some(script.as_bytes())).map_err(PolicyTxnError::NftCheck)?;
        }
    } else if nft_rollback_already_checked(u) {
        // Only deletes, already judged by the check batch before the commit, on the state
        // that is still the kernel's (see `commit_proof`).
    } else {
        // Only deletes: the very batch the rollback sends, as a check.
        let (listed, _) = read_nft_for_rollback_of(u)?;
        if let Some(b) = nft_delete_batch(u, &listed, None, u.table.is_some()).map_err(PolicyTxnError::Batch)? {
            check_batch(&b.finish_check()).map_err(PolicyTxnError::NftBatchCheck)?;
        }
    }
    let before = checked_docs::key(u);
    let docs = rollback_ipt_docs(u)?;
    checked_docs::keep(before, u, &docs);
    if ipt_rollback_proof::take(u, &docs.saves) {
        // Built from the very saves prepare simulated and checked these documents against,
        // in the scratch run of the apply's own (see `kernel_check`).
        return Ok(());
    }
    // Each document against the save it was built from (read just now).
    scratch_check_docs(&[], Some((&docs, u)), |v, v6| match docs.saves.get(&(v.into(), v6)) {
        Some(text) => Ok(text.clone()),
        None => ipt_backend::save(v, family(v6)).map_err(|e| PolicyTxnError::Iptables(Box::new(e))),
    })
}

/// Undoes `u`, in reverse order of apply, finding every object by its tag on a fresh read:
/// sysctls restored (a warning first when a conntrack max goes below the current count);
/// ctguard's raw chains restored to their previous contents (or removed with their jumps);
/// the previous `table inet ctguard` and the previous transaction's nft rules put back (one
/// `nft -f`), then the tagged nft accept rules (found over netlink in the chains inserted
/// into) deleted by handle, with `table inet ctguard` when nothing replaces it, in one netlink
/// batch carrying the generation id read before the rules were (read again on `ERESTART`, up to
/// [`NFT_ROLLBACK_ATTEMPTS`] times); the tagged
/// iptables rules deleted by their exact spec and the previous ones put back, per table commit.
///
/// Guarantees: only ctguard's objects change, so rules others added meanwhile survive; an
/// object already gone counts as undone; idempotent (a second run changes nothing). Every step
/// is attempted even when an earlier one fails; then [`PolicyTxnError::RollbackFailed`]
/// (exit 7) lists what failed.
pub fn rollback(u: &PolicyUndo) -> Result<RollbackReport, PolicyTxnError> {
    let _lap = crate::timing::Lap::start("rollback");
    ipt_backend::share_saves(false);
    u.tag()?;
    let mut report = RollbackReport::default();
    let mut failures: Vec<String> = Vec::new();

    // Sysctls, last written first.
    for s in u.sysctls.iter().rev() {
        let key = match SysctlKey::parse(&s.key) {
            Ok(k) => k,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        if s.key == CONNTRACK_MAX {
            if let Ok(count_key) = SysctlKey::parse(CONNTRACK_COUNT) {
                if let Ok(Some(count)) = crate::sysctl::read(&count_key) {
                    if s.old < count {
                        let w = format!(
                            "restoring {key} = {} below the {count} connections tracked now: new connections may be dropped until the count falls",
                            s.old
                        );
                        tracing::warn!("{w}");
                        report.warnings.push(w);
                    }
                }
            }
        }
        if crate::sysctl::read(&key).ok().flatten() == Some(s.old) {
            continue;
        }
        if let Err(e) = crate::sysctl::write(&key, s.old) {
            failures.push(e.to_string());
        }
    }

    let docs = match checked_docs::take(u).map_or_else(|| rollback_ipt_docs(u), Ok) {
        Ok(d) => Some(d),
        Err(e) => {
            failures.push(format!("reading iptables state: {}", chain_text(&e)));
            None
        }
    };

    // ctguard's raw chains (raw before filter), then iptables-nft leftovers. A raw step that
    // fails keeps every filter accept in place (a notracked flow without its accept would be
    // blackholed); a held xtables lock stops the iptables steps at once (the others would
    // wait for the same lock): the whole rollback is retried later.
    let mut raw_failed = false;
    // An iptables-nft rollback that only takes away: one nf_tables batch for both families and
    // tables ([`ipt_nft_in_one_batch`]); the restores below only when it cannot be one.
    let docs = match docs.as_ref().map(|d| ipt_nft_in_one_batch(u, d, &mut report)) {
        Some(Ok(true)) => None,
        Some(Err(e)) => {
            let w = format!("the iptables-nft rollback as one batch failed ({e}): restoring table by table instead");
            tracing::warn!("{w}");
            report.warnings.push(w);
            docs
        }
        _ => docs,
    };
    // When the rollback only takes away (`rollback_only_takes_away`: nothing for the nft
    // steps between raw and filter to do, nothing of a previous transaction to put back),
    // each family's raw chains and filter rules go in one restore (raw first; a restore stops
    // at the first table it cannot commit, so a failed raw step still keeps that family's
    // accepts): half the tool runs.
    let merged = docs.as_ref().filter(|_| rollback_only_takes_away(u)).map(one_restore_per_family);
    if let Some(per_family) = &merged {
        for doc in per_family {
            let v = IptVariant::from(doc.variant);
            if let Err(e) = ipt_backend::restore(v, family(doc.v6), &doc.text, true) {
                let locked = matches!(&e, IptablesError::Exec { source: ExecError::XtablesLocked { .. }, .. });
                failures.push(format!(
                    "{} (raw chains, then filter rules): {}",
                    v.tool(doc.v6, "-restore"),
                    chain_text(&e)
                ));
                if locked {
                    break;
                }
            }
        }
        if let Err(e) = cleanup_nft_raw(u) {
            failures.push(format!("removing the iptables-nft raw table ctguard created: {}", chain_text(&e)));
        }
    } else if let Some(d) = &docs {
        for doc in &d.raw {
            let v = IptVariant::from(doc.variant);
            if let Err(e) = ipt_backend::restore(v, family(doc.v6), &doc.text, true) {
                raw_failed = true;
                let locked = matches!(&e, IptablesError::Exec { source: ExecError::XtablesLocked { .. }, .. });
                failures.push(format!("{} (raw chains): {}", v.tool(doc.v6, "-restore"), chain_text(&e)));
                if locked {
                    break;
                }
            }
        }
        if let Err(e) = cleanup_nft_raw(u) {
            failures.push(format!("removing the iptables-nft raw table ctguard created: {}", chain_text(&e)));
        }
    }

    // nft, rebuilt from a fresh read on failure: (a) with a previous table or previous rules
    // to put back, one `nft -f` restoring them (objects by name, rules before an anchor: no
    // delete by handle); this transaction's accept rules stay meanwhile, so no flow is ever
    // notracked without its accept rule; (b) the deletes by handle (and the table when
    // nothing replaces it) in one netlink batch carrying the generation id read before the
    // handles were: a ruleset changed in between refuses it (ERESTART) and it is read again.
    let mut last_err = None;
    let mut put_back = !needs_nft_script(u);
    for attempt in 1..=NFT_ROLLBACK_ATTEMPTS {
        if !put_back {
            match nft_put_back(u) {
                Ok(warning) => {
                    report.warnings.extend(warning);
                    put_back = true;
                }
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            }
        }
        match nft_guarded_deletes(u) {
            Ok(()) => {
                last_err = None;
                break;
            }
            Err(e @ PolicyTxnError::GenerationChanged { .. }) => {
                let w = format!(
                    "attempt {attempt}: another writer changed the ruleset between the rollback's read and its batch; read again"
                );
                tracing::warn!("{w}");
                report.warnings.push(w);
                last_err = Some(chain_text(&e));
            }
            Err(e) => last_err = Some(chain_text(&e)),
        }
    }
    if let Some(e) = last_err {
        failures.push(format!("nft rollback ({NFT_ROLLBACK_ATTEMPTS} attempts): {e}"));
    }

    // iptables filter rules, only once the raw chains are gone.
    if raw_failed {
        failures.push("iptables filter accepts kept until ctguard's raw chains can be removed".to_string());
    } else if let (None, Some(d)) = (&merged, &docs) {
        for doc in &d.filter {
            let v = IptVariant::from(doc.variant);
            if let Err(e) = ipt_backend::restore(v, family(doc.v6), &doc.text, true) {
                failures.push(format!("{} (filter rules): {}", v.tool(doc.v6, "-restore"), chain_text(&e)));
            }
        }
    }
    if failures.is_empty() {
        Ok(report)
    } else {
        for f in &failures {
            tracing::error!("rollback of {}: {f}", u.tag);
        }
        Err(PolicyTxnError::RollbackFailed { failures })
    }
}

/// The deletions of `u`'s rollback documents `d` when they can go as one iptables-nft batch
/// (`ipt_nft_undo`): `u` only takes away ([`rollback_only_takes_away`]) and is iptables-nft's
/// alone, and `d` holds only deletions. Pure.
fn ipt_nft_takes(u: &PolicyUndo, d: &RollbackDocs) -> Option<Vec<ipt_nft_undo::TableTakes>> {
    if !rollback_only_takes_away(u)
        || u.raw.iter().any(|r| r.variant != Variant::Nft)
        || u.ipt_insertions.iter().any(|i| i.variant != Variant::Nft)
    {
        return None;
    }
    let docs: Vec<&IptDoc> = d.raw.iter().chain(&d.filter).collect();
    ipt_nft_undo::takes_of(&docs)
}

/// What one attempt at the iptables-nft rollback batch came to.
enum BatchAttempt {
    /// Sent and committed, or nothing to delete.
    Done,
    /// A rule to delete is not printable or not found over netlink: nothing sent.
    NotExpressible,
    /// Another writer committed since the read (the batch was refused, or a dump interrupted).
    Raced,
}

/// One attempt, in the calling thread's namespace: the generation id, then what `takes` and
/// `cleanups` touch (the rules by `hints` where they hold), then the deletes in one batch
/// carrying that id. `fault` fires the test point `rollback:foreign-change` before the send.
fn ipt_nft_batch_attempt(
    takes: &[ipt_nft_undo::TableTakes],
    cleanups: &[ipt_nft_undo::RawCleanup],
    hints: &[IptNftHandle],
    fault: bool,
) -> Result<BatchAttempt, String> {
    use ipt_nft_now::{read_now, ReadError};
    use ipt_nft_undo::{batch, resolve};
    let genid = get_genid().map_err(|e| chain_text(&e))?;
    let now = match read_now(takes, cleanups, hints) {
        Ok(now) => now,
        Err(ReadError::Interrupted(_)) => return Ok(BatchAttempt::Raced),
        Err(e) => return Err(chain_text(&e)),
    };
    let Some(deletes) = resolve(takes, &now, cleanups) else { return Ok(BatchAttempt::NotExpressible) };
    let Some(b) = batch(&deletes, genid).map_err(|e| chain_text(&e))? else { return Ok(BatchAttempt::Done) };
    if fault {
        crate::fault::foreign_change("rollback:foreign-change");
    }
    match send_batch(&b.finish()) {
        Ok(()) => Ok(BatchAttempt::Done),
        Err(NetlinkError::GenerationChanged { .. }) => Ok(BatchAttempt::Raced),
        Err(e) => Err(chain_text(&e)),
    }
}

/// The iptables part of `u`'s rollback, documents `d`, as one nf_tables batch carrying the
/// generation id read before the rules it deletes (`ipt_nft_undo`): `Ok(true)` when it is done
/// (or there was nothing to delete), `Ok(false)` when it cannot be one batch (not iptables-nft
/// alone, a document that does more than delete, a rule the netlink printer cannot print or
/// find): nothing was sent, the restores do it. A batch refused because another writer
/// committed in between is read and sent again ([`NFT_ROLLBACK_ATTEMPTS`] times, a warning
/// each); any other refusal is an error, with nothing applied (one kernel transaction).
fn ipt_nft_in_one_batch(u: &PolicyUndo, d: &RollbackDocs, report: &mut RollbackReport) -> Result<bool, String> {
    let _lap = crate::timing::Lap::start("rollback: iptables-nft in one batch");
    let Some(takes) = ipt_nft_takes(u, d) else { return Ok(false) };
    let cleanups = ipt_nft_undo::RawCleanup::of(&u.raw);
    if takes.is_empty() && cleanups.is_empty() {
        return Ok(true);
    }
    for attempt in 1..=NFT_ROLLBACK_ATTEMPTS {
        match ipt_nft_batch_attempt(&takes, &cleanups, &u.ipt_nft_handles, true)? {
            BatchAttempt::Done => return Ok(true),
            BatchAttempt::NotExpressible => {
                tracing::debug!("rollback of {}: a rule to delete is not printable or not found over netlink", u.tag);
                return Ok(false);
            }
            BatchAttempt::Raced => {
                let w = format!(
                    "attempt {attempt}: another writer changed the ruleset between the rollback's read and its batch; read again"
                );
                tracing::warn!("{w}");
                report.warnings.push(w);
            }
        }
    }
    Err(format!("another writer changed the ruleset at each of {NFT_ROLLBACK_ATTEMPTS} attempts"))
}

/// The rules tagged with `u`'s tag that `monitor` saw committed into the chains `u` inserted
/// into in iptables-nft's `ip`/`ip6` tables,
/// with their handles and save lines; empty when a notification was lost or a rule does not
/// print (the rollback then finds them by reading their chains).
fn tagged_rules_announced(monitor: &NftMonitor, u: &PolicyUndo) -> Vec<IptNftHandle> {
    let Ok(Some(msgs)) = monitor.messages() else { return Vec::new() };
    let comment = format!("--comment \"{}\"", u.tag);
    let mut out = Vec::new();
    for (_, payload) in msgs.iter().filter(|(ty, _)| *ty == libc::NFT_MSG_NEWRULE as u16) {
        let Some(r) = crate::backend::nft_read::decode_rule(payload) else { return Vec::new() };
        let v6 = match r.family.as_str() {
            "ip" => false,
            "ip6" => true,
            _ => continue,
        };
        // Only the accepts inserted into others' chains (ctguard's raw chains go whole).
        let inserted = u.ipt_insertions.iter().any(|i| i.v6 == v6 && i.table == r.table && i.chain == r.chain);
        let Some(line) = crate::backend::ipt_nft_rule::save_line(&r, v6).filter(|_| inserted) else { continue };
        if line.contains(&comment) {
            out.push(IptNftHandle { v6, table: r.table, chain: r.chain, handle: r.handle, line });
        }
    }
    out
}

/// True when `u`'s rollback only takes away: the nft steps have nothing to do (no `table inet
/// ctguard` to delete or put back, no nft accept rule to delete, no previous nft rule to put
/// back), nothing of a previous transaction goes back (no removed rule, no raw chain that
/// existed before), and each family has its raw chains in one variant. Then each family's
/// raw and filter documents may go in one restore. Pure.
fn rollback_only_takes_away(u: &PolicyUndo) -> bool {
    let one_variant_per_family = u.raw.iter().all(|r| u.raw.iter().all(|o| o.v6 != r.v6 || o.variant == r.variant));
    u.table.is_none()
        && u.nft_insertions.is_empty()
        && !needs_nft_script(u)
        && u.removed_previous.is_empty()
        && u.raw.iter().all(|r| !r.before.exist && r.before.jumps.is_empty())
        && one_variant_per_family
}

/// `first` then `then` as one document per (variant, family), in the order of their first
/// document: that family's documents of `first`, then its documents of `then`. Pure.
fn concat_per_family(first: &[IptDoc], then: &[IptDoc]) -> Vec<IptDoc> {
    let mut out: Vec<IptDoc> = Vec::new();
    for doc in first.iter().chain(then) {
        match out.iter_mut().find(|o| o.variant == doc.variant && o.v6 == doc.v6) {
            Some(o) => {
                if !o.text.is_empty() && !o.text.ends_with('\n') {
                    o.text.push('\n');
                }
                o.text.push_str(&doc.text);
            }
            None => out.push(doc.clone()),
        }
    }
    out
}

/// The rollback's documents as one per (variant, family): that family's raw documents, then
/// its filter documents ([`concat_per_family`]). Pure.
fn one_restore_per_family(d: &RollbackDocs) -> Vec<IptDoc> {
    concat_per_family(&d.raw, &d.filter)
}

/// True when [`apply`] of `p` sends an nft batch (ctguard's table, nft accepts, a previous
/// transaction's nft rules to remove), or may (its encoding fails: apply then fails there, as
/// before). Pure.
fn nft_has_work(p: &Prepared) -> bool {
    !matches!(batch_builder(p, None), Ok(None))
}

/// iptables-nft creates `table ip raw` and its base chains on demand; where they did not exist
/// before the transaction and are empty now, delete them so the nft ruleset is as before.
fn cleanup_nft_raw(u: &PolicyUndo) -> Result<(), PolicyTxnError> {
    let _lap = crate::timing::Lap::start("rollback: iptables-nft raw cleanup");
    let todo: Vec<&RawBefore> = u.raw.iter().filter(|r| r.variant == Variant::Nft).collect();
    if todo.is_empty() {
        return Ok(());
    }
    let mut script = String::new();
    for r in todo {
        let fam = if r.v6 { "ip6" } else { "ip" };
        // Only the raw table of this family, over netlink (cheap at any ruleset size); none is fine.
        let chains = raw_table_now(fam)?;
        if chains.is_empty() {
            continue;
        }
        let empty = chains.iter().all(|(_, rules)| *rules == 0);
        if !r.nft_table_existed {
            if empty {
                let _ = writeln!(script, "delete table {fam} raw");
            }
            continue;
        }
        for (name, rules) in chains {
            if rules == 0 && !r.nft_chains_before.contains(&name) {
                let _ = writeln!(script, "delete chain {fam} raw {name}");
            }
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    tool("nft")?.run(&["-f", "-"], Some(script.as_bytes())).map(|_| ()).map_err(|source| PolicyTxnError::Exec {
        what: "nft: deleting the empty iptables-nft raw objects".into(),
        source,
    })
}

/// The chains of `table FAMILY raw` with their rule counts, read over netlink (two dumps
/// filtered to that table in the kernel); empty when the table does not exist. Read-only.
fn raw_table_now(family: &str) -> Result<Vec<(String, usize)>, PolicyTxnError> {
    use crate::backend::nft_read::{decode_chain, decode_rule};
    let err = |source| PolicyTxnError::RuleDump { chain: format!("{family} raw"), source };
    let nfproto = crate::render::nft_batch::nfproto_of(family).unwrap_or(0) as u8;
    let table: &[u8] = b"raw\0";
    let chains = crate::backend::netlink::dump(
        libc::NFT_MSG_GETCHAIN as u16,
        nfproto,
        &[(1, table)],
        "GETCHAIN (the raw table's chains)",
    )
    .map_err(err)?;
    let rules = crate::backend::netlink::dump(
        libc::NFT_MSG_GETRULE as u16,
        nfproto,
        &[(1, table)],
        "GETRULE (the raw table's rules)",
    )
    .map_err(err)?;
    let mut out: Vec<(String, usize)> = chains
        .msgs
        .iter()
        .filter(|m| m.ty == libc::NFT_MSG_NEWCHAIN as u16)
        .filter_map(|m| decode_chain(&m.payload))
        .filter(|c| c.table == "raw")
        .map(|c| (c.name, 0))
        .collect();
    for r in rules.msgs.iter().filter(|m| m.ty == libc::NFT_MSG_NEWRULE as u16).filter_map(|m| decode_rule(&m.payload))
    {
        if let Some((_, n)) = out.iter_mut().find(|(name, _)| *name == r.chain).filter(|_| r.table == "raw") {
            *n += 1;
        }
    }
    Ok(out)
}

/// An error and its sources on one line.
pub fn chain_text(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The state a policy transaction must restore, as comparable text: `nft list ruleset`
/// (counters zeroed), every installed iptables save of both variants and families (`#` lines
/// dropped, counters zeroed) and the values of `keys`. For before/after display and tests.
///
/// Guarantees: read-only; two calls on an unchanged target return equal strings.
pub fn listing(keys: &[SysctlKey]) -> Result<String, PolicyTxnError> {
    let mut s = String::new();
    if let Ok(nft) = Tool::find("nft") {
        let text = nft
            .run(&["list", "ruleset"], None)
            .map_err(|source| PolicyTxnError::Exec { what: "nft list ruleset".into(), source })?;
        s.push_str("### nft list ruleset\n");
        for line in text.lines() {
            s.push_str(&zero_nft_counters(line));
            s.push('\n');
        }
    }
    for &(name, _, _) in SAVE_TOOLS {
        let Ok(t) = Tool::find(name) else { continue };
        let text = t.run(&[], None).map_err(|source| PolicyTxnError::Exec { what: name.to_string(), source })?;
        let _ = writeln!(s, "### {name}");
        s.push_str(&ipt::normalize_save(&text));
    }
    s.push_str("### sysctl\n");
    for k in keys {
        let v = crate::sysctl::read(k).map_err(PolicyTxnError::Sysctl)?;
        let _ = writeln!(s, "{k} = {}", v.map_or("(missing)".to_string(), |v| v.to_string()));
    }
    Ok(s)
}

/// What a policy transaction changes, as comparable text for the journal's before/after and
/// `show TXID`: `table inet ctguard`; ctguard's tagged rules in the chains `u` inserts into or
/// removes from (read over netlink, their texts taken from `u`); each installed iptables
/// variant's `raw` table and its rules tagged `ctguard:`; and the sysctls `keys`.
///
/// Guarantees: read-only; no full `nft` listing (cost independent of the size of the host's
/// own chains but for one kernel dump of each chain touched); two calls on an unchanged
/// target return equal strings, equal to [`Prepared::before`] before apply and to
/// [`after_listing`] right after it. [`listing`] stays the whole-state comparison of the tests.
pub fn scope_listing(u: &PolicyUndo, keys: &[SysctlKey]) -> Result<String, PolicyTxnError> {
    let _lap = crate::timing::Lap::start("scope listing");
    let table_text = live_backend::ctguard_table_text().map_err(PolicyTxnError::Live)?;
    let mut chains = Vec::new();
    for (f, t, c) in scope_chains(u) {
        let rules = match dump_chain_rules(f, t, c) {
            Ok(r) => r.into_iter().map(|r| (r.handle, r.comment)).collect(),
            // A chain (or table) that is gone holds none of ctguard's rules.
            Err(NetlinkError::Query { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Vec::new(),
            Err(source) => return Err(PolicyTxnError::RuleDump { chain: format!("{f} {t} {c}"), source }),
        };
        chains.push(((f.to_string(), t.to_string(), c.to_string()), rules));
    }
    let mut saves = Vec::new();
    for &(name, variant, v6) in SAVE_TOOLS {
        let Ok(t) = Tool::find(name) else { continue };
        let text = if live_backend::save_would_be_empty(variant, v6, None) {
            String::new()
        } else {
            t.run(&[], None).map_err(|source| PolicyTxnError::Exec { what: name.to_string(), source })?
        };
        saves.push((name, crate::live::iptables_save::without_incompatible(&text).0));
    }
    Ok(scope_text(u, table_text.as_deref(), &chains, &saves, &read_keys(keys)?))
}

/// [`scope_listing`] as it reads at the snapshot `p` was prepared from, without reading again
/// (the table, the chains' rules — `chains`, taken from the snapshot — and the saves are the
/// snapshot's; the sysctls are read).
fn scope_listing_at_snapshot(
    u: &PolicyUndo,
    keys: &[SysctlKey],
    snap: &Snapshot,
    chains: &[ScopedChain],
) -> Result<String, PolicyTxnError> {
    let saves = snapshot_saves(&snap.live);
    Ok(scope_text(u, snap.table_text.as_deref(), chains, &saves, &read_keys(keys)?))
}

/// [`scope_listing`] right after [`apply`] of `p` returned `u`, from what the commit proved
/// instead of a second read of the chains: the batch carried the snapshot's generation id (no
/// other writer committed in between) and the kernel echoed each inserted rule's handle, so
/// each chain is the snapshot's with the previous transaction's rules deleted and ctguard's
/// inserted where the batch put them. Read now: `table inet ctguard` when the batch replaced
/// it, the saves of the iptables variants and families apply wrote to, the sysctls.
///
/// Falls back to [`scope_listing`] when an inserted rule's handle is unknown.
pub fn after_listing(p: &Prepared, u: &PolicyUndo) -> Result<String, PolicyTxnError> {
    let _lap = crate::timing::Lap::start("scope listing after (from the commit)");
    // The rollback check that follows reads the same saves (it ends the sharing).
    ipt_backend::share_saves(true);
    if u.nft_insertions.iter().any(|i| i.handle.is_none()) {
        return scope_listing(u, &p.scope_keys);
    }
    let table_text = if p.table.is_some() {
        live_backend::ctguard_table_text().map_err(PolicyTxnError::Live)?
    } else if p.delete_table {
        None
    } else {
        p.scope_table_text.clone()
    };
    let deleted: Vec<(&str, &str, &str, u64)> = u
        .removed_previous
        .iter()
        .filter_map(|r| match r {
            Removed::Nft { family, table, chain, handle, .. } => {
                Some((family.as_str(), table.as_str(), chain.as_str(), *handle))
            }
            _ => None,
        })
        .collect();
    let mut chains = Vec::new();
    for (f, t, c) in scope_chains(u) {
        let mut rules: ChainRules = p
            .scope_rules
            .iter()
            .find(|((cf, ct, cc), _)| (cf.as_str(), ct.as_str(), cc.as_str()) == (f, t, c))
            .map(|(_, rules)| rules.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|(h, _)| !deleted.contains(&(f, t, c, *h)))
            .collect();
        // Batch order: each insert goes right before its anchor (so several before one anchor
        // keep their order), each append to the end.
        for (ins, planned) in u.nft_insertions.iter().zip(p.plan.insertions.iter().filter(|i| is_nft_insertion(i))) {
            if (ins.family.as_str(), ins.table.as_str(), ins.chain.as_str()) != (f, t, c) {
                continue;
            }
            let rule = (ins.handle.unwrap_or_default(), Some(u.tag.clone()));
            let at = match &planned.position {
                Position::Before { handle: Some(h), .. } => rules.iter().position(|(x, _)| x == h),
                _ => None,
            };
            match at {
                Some(i) => rules.insert(i, rule),
                None => rules.push(rule),
            }
        }
        chains.push(((f.to_string(), t.to_string(), c.to_string()), rules));
    }
    let written = |v: IptVariant, v6: bool| {
        p.ipt_filter.iter().chain(p.ipt_raw.iter()).any(|d| IptVariant::from(d.variant) == v && d.v6 == v6)
            || (v == IptVariant::Nft && p.request.policy.notrack.is_empty() && u.raw.iter().any(|r| r.v6 == v6))
    };
    // The saves apply wrote to, read again (side by side); the others are the snapshot's.
    // (save tool, the snapshot's text, (variant, IPv6) when apply wrote to it).
    type Listed<'a> = (&'a str, String, Option<(IptVariant, bool)>);
    let listed: Vec<Listed> = snapshot_saves(&p.live)
        .into_iter()
        .filter_map(|(name, text)| {
            let &(_, v, v6) = SAVE_TOOLS.iter().find(|(n, _, _)| *n == name)?;
            Some((name, text, written(v, v6).then_some((v, v6))))
        })
        .collect();
    let which: Vec<(IptVariant, IpFamily)> =
        listed.iter().filter_map(|(_, _, w)| w.map(|(v, v6)| (v, family(v6)))).collect();
    let mut now = ipt_backend::saves_at_once(&which).into_iter();
    let mut saves = Vec::new();
    for (name, text, w) in listed {
        // One read per written save, in order.
        let text = match w.and_then(|_| now.next()) {
            Some(read) => read.map_err(|e| PolicyTxnError::Iptables(Box::new(e)))?,
            None => text,
        };
        saves.push((name, text));
    }
    Ok(scope_text(u, table_text.as_deref(), &chains, &saves, &read_keys(&p.scope_keys)?))
}

fn is_nft_insertion(i: &crate::render::planner::Insertion) -> bool {
    matches!((&i.owner, &i.rule), (Owner::Nft { .. }, RuleSpec::Nft(_)))
}

/// The chains a scope listing of `u` covers: those it inserts into (outside `table inet
/// ctguard`) and those it removes the previous transaction's rules from; sorted, once each.
fn scope_chains(u: &PolicyUndo) -> Vec<(&str, &str, &str)> {
    let mut chains: Vec<(&str, &str, &str)> = insertion_chains(u);
    for r in &u.removed_previous {
        if let Removed::Nft { family, table, chain, .. } = r {
            chains.push((family.as_str(), table.as_str(), chain.as_str()));
        }
    }
    chains.sort_unstable();
    chains.dedup();
    chains
}

/// Each installed save tool's output as read into `live` (incompatible tables already left
/// out), in [`SAVE_TOOLS`] order.
fn snapshot_saves(live: &LiveState) -> Vec<(&'static str, String)> {
    SAVE_TOOLS.iter().filter_map(|&(name, v, v6)| dump_of(live, v, v6).map(|d| (name, d.text.clone()))).collect()
}

/// The sysctls `keys` as a scope listing shows them.
fn read_keys(keys: &[SysctlKey]) -> Result<Vec<(SysctlKey, String)>, PolicyTxnError> {
    keys.iter()
        .map(|k| {
            let v = crate::sysctl::read(k).map_err(PolicyTxnError::Sysctl)?;
            Ok((k.clone(), v.map_or("(missing)".to_string(), |v| v.to_string())))
        })
        .collect()
}

/// One chain's rules as a scope listing needs them: (handle, comment), in chain order.
type ChainRules = Vec<(u64, Option<String>)>;

/// A chain (family, table, chain) of [`scope_chains`] with its [`ChainRules`].
type ScopedChain = ((String, String, String), ChainRules);

/// The text of a scope listing (pure): see [`scope_listing`]. `chains` holds each chain of
/// [`scope_chains`] with its rules as (handle, comment); `saves` each installed save tool's
/// output; `sysctls` each key with its value as shown.
fn scope_text(
    u: &PolicyUndo,
    table_text: Option<&str>,
    chains: &[ScopedChain],
    saves: &[(&str, String)],
    sysctls: &[(SysctlKey, String)],
) -> String {
    let mut s = String::new();
    if let Some(text) = table_text {
        s.push_str("### nft table inet ctguard\n");
        for line in text.lines() {
            s.push_str(&zero_nft_counters(line));
            s.push('\n');
        }
    }
    for ((f, t, c), rules) in chains {
        let ours: Vec<&(u64, Option<String>)> =
            rules.iter().filter(|(_, c)| c.as_deref().is_some_and(|c| c.starts_with("ctguard:"))).collect();
        if ours.is_empty() {
            continue;
        }
        let _ = writeln!(s, "### nft {f} {t} {c}: ctguard's rules");
        for (handle, comment) in ours {
            let text = u
                .nft_insertions
                .iter()
                .find(|i| i.handle == Some(*handle) && i.family == *f && i.table == *t && i.chain == *c)
                .map(|i| i.rule.clone())
                .or_else(|| {
                    u.removed_previous.iter().find_map(|x| match x {
                        Removed::Nft { family, table, chain, handle: h, text, .. }
                            if h == handle && family == f && table == t && chain == c =>
                        {
                            Some(text.split(" # handle ").next().unwrap_or(text).trim_end().to_string())
                        }
                        _ => None,
                    })
                })
                .unwrap_or_else(|| format!("(a rule with comment \"{}\")", comment.as_deref().unwrap_or_default()));
            let _ = writeln!(s, "{text}");
        }
    }
    for (name, text) in saves {
        let mut table = String::new();
        let mut lines = Vec::new();
        // (As `normalize_save` would show them, normalizing only the lines kept: a save may
        // hold a 100k-rule chain.)
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
            }
            if table == "raw" || line.contains("ctguard:") {
                let line = ipt::zero_counters(line);
                lines.push(if table == "raw" { line } else { format!("[{table}] {line}") });
            }
        }
        if !lines.is_empty() {
            let _ = writeln!(s, "### {name}: raw, and ctguard's rules");
            for l in lines {
                let _ = writeln!(s, "{l}");
            }
        }
    }
    s.push_str("### sysctl\n");
    for (k, v) in sysctls {
        let _ = writeln!(s, "{k} = {v}");
    }
    s
}

/// `counter packets N bytes M` → `counter packets 0 bytes 0`.
fn zero_nft_counters(line: &str) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if words[i] == "packets" || words[i] == "bytes" {
            if let Some(n) = words.get(i + 1) {
                if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && out.last() != Some(&"quota") {
                    out.push(words[i]);
                    out.push("0");
                    i += 2;
                    continue;
                }
            }
        }
        out.push(words[i]);
        i += 1;
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {

    /// One restore per family only for a rollback that only takes away: not when raw chains
    /// existed before (a re-apply puts them back), when a family's raw chains are in two
    /// variants, or when the nft steps have something to do.
    #[test]
    fn a_rollback_merges_per_family_only_when_it_only_takes_away() {
        let raw = |variant, v6, existed: bool| RawBefore {
            variant,
            v6,
            before: crate::render::ipt_edit::RawChains { exist: existed, lines: Vec::new(), jumps: Vec::new() },
            jumps_added: Vec::new(),
            nft_table_existed: false,
            nft_chains_before: Vec::new(),
        };
        let mut u = PolicyUndo::empty("ctguard:t");
        u.raw = vec![raw(Variant::Nft, false, false), raw(Variant::Nft, true, false)];
        assert!(rollback_only_takes_away(&u), "a first apply's rollback");
        let mut again = u.clone();
        again.raw[0] = raw(Variant::Nft, false, true);
        assert!(!rollback_only_takes_away(&again), "raw chains that existed before go back");
        let mut two = u.clone();
        two.raw.push(raw(Variant::Legacy, false, false));
        assert!(!rollback_only_takes_away(&two), "IPv4 raw chains in two variants");
        let mut nft = u.clone();
        nft.nft_insertions.push(NftInsertion {
            family: "inet".into(),
            table: "host".into(),
            chain: "input".into(),
            handle: Some(7),
            rule: "udp dport 53 ct state untracked accept".into(),
        });
        assert!(!rollback_only_takes_away(&nft), "an nft accept to delete between raw and filter");
    }

    /// The rollback's documents merged per family: raw before filter, families in order.
    #[test]
    fn a_rollback_restores_each_familys_raw_then_filter_documents_in_one_run() {
        let doc = |variant, v6, text: &str| IptDoc { variant, v6, text: text.to_string() };
        let d = RollbackDocs {
            raw: vec![doc(Variant::Nft, false, "*raw\nA\nCOMMIT\n"), doc(Variant::Nft, true, "*raw\nB\nCOMMIT")],
            filter: vec![
                doc(Variant::Nft, true, "*filter\nC\nCOMMIT\n"),
                doc(Variant::Legacy, false, "*filter\nD\nCOMMIT\n"),
            ],
            saves: BTreeMap::new(),
        };
        let got: Vec<(Variant, bool, String)> =
            one_restore_per_family(&d).into_iter().map(|d| (d.variant, d.v6, d.text)).collect();
        assert_eq!(
            got,
            vec![
                (Variant::Nft, false, "*raw\nA\nCOMMIT\n".to_string()),
                (Variant::Nft, true, "*raw\nB\nCOMMIT\n*filter\nC\nCOMMIT\n".to_string()),
                (Variant::Legacy, false, "*filter\nD\nCOMMIT\n".to_string()),
            ]
        );
    }
    use super::*;

    #[test]
    fn nft_counters_are_zeroed() {
        assert_eq!(
            zero_nft_counters("\t\tudp dport 53 counter packets 12 bytes 840 accept"),
            "\t\tudp dport 53 counter packets 0 bytes 0 accept"
        );
    }

    #[test]
    fn flush_commands_per_port_family_and_source() {
        let p = crate::model::parse_policy(
            "[[notrack]]\nprotocols = [\"udp\"]\nports = [53, \"60-61\"]\nsources = [\"10.0.0.0/8\"]\nflush_existing = true\n",
            crate::model::Format::Toml,
        )
        .expect("valid");
        let local: Vec<std::net::IpAddr> =
            ["198.18.0.1", "127.0.0.1", "fd42::1"].iter().map(|a| a.parse().expect("ip")).collect();
        let (cmds, w) = flush_commands(&p, &local);
        assert!(w.is_empty());
        // 3 ports × the two local v4 addresses (the v6 one has no v6 source to match).
        assert_eq!(cmds.len(), 6, "{cmds:?}");
        assert_eq!(
            cmds[0],
            [
                "-D",
                "-f",
                "ipv4",
                "-p",
                "udp",
                "--orig-port-dst",
                "53",
                "-s",
                "10.0.0.0",
                "--mask-src",
                "255.0.0.0",
                "-d",
                "198.18.0.1"
            ]
        );
        // Regression (issue 15): entries whose original destination is not this host — its own
        // queries to an upstream's port 53 — are never matched: every command names a local
        // destination.
        assert!(cmds.iter().all(|c| c.windows(2).any(|w| w[0] == "-d" && local.iter().any(|a| a.to_string() == w[1]))));
        let big = crate::model::parse_policy(
            "[[notrack]]\nprotocols = [\"udp\"]\nports = [\"1000-2000\"]\nflush_existing = true\n",
            crate::model::Format::Toml,
        )
        .expect("valid");
        let (cmds, w) = flush_commands(&big, &local);
        assert!(cmds.is_empty());
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn undo_round_trips_through_json() {
        let u = PolicyUndo {
            tag: "ctguard:t-1".into(),
            backend: Backend::Nft,
            genid_before: 3,
            genid_after: Some(5),
            table: Some(TableBefore { text: None }),
            nft_insertions: vec![NftInsertion {
                family: "inet".into(),
                table: "host".into(),
                chain: "input".into(),
                handle: Some(9),
                rule: "udp dport 53 ct state untracked accept comment \"ctguard:t-1\"".into(),
            }],
            ipt_insertions: Vec::new(),
            raw: vec![RawBefore {
                variant: Variant::Legacy,
                v6: false,
                before: RawChains::default(),
                jumps_added: vec![("PREROUTING".into(), "CTGUARD-PRE".into())],
                nft_table_existed: false,
                nft_chains_before: Vec::new(),
            }],
            sysctls: vec![SysctlWritten { key: "net.netfilter.nf_conntrack_udp_timeout".into(), old: 30, new: 10 }],
            removed_previous: vec![Removed::Nft {
                family: "inet".into(),
                table: "host".into(),
                chain: "input".into(),
                handle: 4,
                text: "x".into(),
                anchor: Some(5),
            }],
            warnings: Vec::new(),
            ipt_nft_handles: vec![IptNftHandle {
                v6: true,
                table: "filter".into(),
                chain: "INPUT".into(),
                handle: 12,
                line: "-A INPUT -j ACCEPT".into(),
            }],
        };
        let j = serde_json::to_string(&u).expect("serializes");
        let back: PolicyUndo = serde_json::from_str(&j).expect("deserializes");
        assert_eq!(back, u);
        assert_eq!(u.tag().expect("valid").as_str(), "ctguard:t-1");
        // A record written before the handles were kept reads with none.
        let mut old: serde_json::Value = serde_json::from_str(&j).expect("json");
        old.as_object_mut().map(|o| o.remove("ipt_nft_handles"));
        let back: PolicyUndo = serde_json::from_value(old).expect("an older record deserializes");
        assert!(back.ipt_nft_handles.is_empty());
    }
}
