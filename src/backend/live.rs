//! Reads the live state of the current thread's network namespace (DESIGN §7): the nft
//! ruleset over netlink ([`super::nft_read`]; `nft -j list ruleset` when `CTGUARD_NFT_READ=json`),
//! `iptables-save`/`ip6tables-save` of both variants, and sysctls. Call it
//! inside `crate::netns::Target::run`. Reads only; changes nothing.

use std::collections::BTreeMap;

use super::exec::{ExecError, Tool};
use crate::live::fw::IptVariant;
use crate::live::iptables_save::{self, SaveParseError};
use crate::live::nft_json::{self, NftJsonError};
use crate::live::{iptables_fw, IptDump, LiveState};
use crate::model::names::SysctlKey;
use crate::render::sysctl::LiveSysctl;

/// Errors reading the live state.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// A tool failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// nft's JSON was not understood.
    #[error(transparent)]
    NftJson(#[from] NftJsonError),
    /// The ruleset could not be read over netlink.
    #[error("reading the nf_tables ruleset: {0}")]
    NftRead(#[from] super::nft_read::NftReadError),
    /// An iptables dump was refused (e.g. an incompatible table).
    #[error("{tool}: {source}")]
    Save {
        /// Which tool.
        tool: String,
        /// Why.
        #[source]
        source: SaveParseError,
    },
    /// The thread running a save tool panicked.
    #[error("reading an iptables save: its thread panicked")]
    SavePanicked,
    /// A sysctl could not be read.
    #[error(transparent)]
    Sysctl(#[from] crate::sysctl::SysctlError),
}

/// The iptables save tools ctguard reads, with their variant and family.
pub const SAVE_TOOLS: &[(&str, IptVariant, bool)] = &[
    ("iptables-nft-save", IptVariant::Nft, false),
    ("ip6tables-nft-save", IptVariant::Nft, true),
    ("iptables-legacy-save", IptVariant::Legacy, false),
    ("ip6tables-legacy-save", IptVariant::Legacy, true),
];

/// The environment variable that selects how the nft ruleset is read: `json` runs
/// `nft -j list ruleset` (the previous reader, for debugging); anything else, or unset, reads
/// it over netlink.
pub const NFT_READ_ENV: &str = "CTGUARD_NFT_READ";

/// True when `CTGUARD_NFT_READ=json` asks for nft's JSON instead of the netlink reader.
pub fn nft_read_json() -> bool {
    std::env::var(NFT_READ_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"))
}

/// The nft ruleset in the neutral model: over netlink (one consistent dump, between two equal
/// generation ids), or parsed from `nft -j list ruleset` when [`nft_read_json`]. Empty when
/// `nft` is not installed (as before: no nftables on this host to plan against).
pub fn read_nft() -> Result<crate::live::nft_json::NftRuleset, LiveError> {
    let Ok(nft) = Tool::find("nft") else { return Ok(Default::default()) };
    if nft_read_json() {
        return Ok(nft_json::parse(&nft.run(&["-j", "list", "ruleset"], None)?)?);
    }
    Ok(super::nft_read::read()?)
}

/// Reads the nft ruleset ([`read_nft`], when nft is installed) and every iptables dump whose
/// tool is installed. An "incompatible table" warning in a dump is an error (DESIGN §1).
pub fn read() -> Result<LiveState, LiveError> {
    let nft_installed = Tool::find("nft").is_ok();
    if !nft_installed || nft_read_json() {
        let lap = crate::timing::Lap::start("read: nft");
        let nft = read_nft()?;
        drop(lap);
        let iptables = read_saves(None)?;
        return Ok(LiveState { nft, iptables });
    }
    // The saves first (only of families with tables), then nft's view without the rules of
    // the tables iptables-nft owns: those are planned from its save (LiveState::chains).
    let lap = crate::timing::Lap::start("read: tables");
    let tables = super::nft_read::tables()?;
    drop(lap);
    let iptables = read_saves(Some(&tables))?;
    let skip = ipt_nft_tables(&iptables);
    let _lap = crate::timing::Lap::start("read: nft");
    let (nft, _) = super::nft_read::read_skipping(&skip)?;
    Ok(LiveState { nft, iptables })
}

/// The nf_tables tables (family, name) iptables-nft owns, from its dumps in `iptables`: the
/// ones [`read`] reads from the saves and leaves out of the netlink read
/// ([`super::nft_read::read_skipping`]). Sorted, each once.
pub fn ipt_nft_tables(iptables: &[IptDump]) -> Vec<(String, String)> {
    ipt_nft_tables_of(iptables.iter().filter(|d| d.variant == IptVariant::Nft).flat_map(|d| &d.fw.chains))
}

/// The nf_tables tables (family, name) of the iptables-nft chains among `chains`. Sorted, each
/// once.
pub fn ipt_nft_tables_of<'a>(chains: impl IntoIterator<Item = &'a crate::live::fw::FwChain>) -> Vec<(String, String)> {
    chains
        .into_iter()
        .filter(|c| matches!(c.owner, crate::live::fw::Owner::Iptables { variant: IptVariant::Nft, .. }))
        .filter_map(|c| c.owner.nf_table())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Every installed save tool's dump, in [`SAVE_TOOLS`] order; `tables` (the nf_tables tables,
/// when known) spares the run of a tool that would print nothing ([`save_would_be_empty`]).
/// A table iptables-nft calls incompatible is left to nft; any other refusal is an error.
pub fn read_saves(tables: Option<&[(String, String)]>) -> Result<Vec<IptDump>, LiveError> {
    read_saves_of(tables, &[IptVariant::Nft, IptVariant::Legacy])
}

/// [`read_saves`] of the tools of `variants` only.
pub fn read_saves_of(tables: Option<&[(String, String)]>, variants: &[IptVariant]) -> Result<Vec<IptDump>, LiveError> {
    let _lap = crate::timing::Lap::start("read: iptables saves");
    let installed: Vec<(&str, IptVariant, bool, Tool)> = SAVE_TOOLS
        .iter()
        .filter(|t| variants.contains(&t.1))
        .filter_map(|&(name, variant, v6)| Tool::find(name).ok().map(|t| (name, variant, v6, t)))
        .collect();
    // The tools that have something to print run side by side (each is mostly its own start-up
    // and the kernel's dump); a thread started here is in this thread's namespace.
    let outputs: Vec<Result<String, LiveError>> = std::thread::scope(|s| {
        let runs: Vec<_> = installed
            .iter()
            .map(|(_, variant, v6, tool)| {
                (!save_would_be_empty(*variant, *v6, tables))
                    .then(|| s.spawn(move || tool.run(&[], None).map_err(LiveError::from)))
            })
            .collect();
        runs.into_iter()
            .map(|h| match h {
                Some(h) => h.join().unwrap_or(Err(LiveError::SavePanicked)),
                None => Ok(String::new()),
            })
            .collect()
    });
    let mut out = Vec::new();
    for ((name, variant, v6, _), saved) in installed.into_iter().zip(outputs) {
        let saved = saved?;
        // A table iptables-nft calls incompatible is a native nft table: nft's JSON has it.
        let (text, native) = iptables_save::without_incompatible(&saved);
        if !native.is_empty() {
            tracing::debug!(tool = name, ?native, "tables left to nft (native, named like iptables tables)");
        }
        let dump = iptables_save::parse(&text).map_err(|source| LiveError::Save { tool: name.into(), source })?;
        out.push(IptDump { variant, v6, fw: iptables_fw::convert(&dump, variant, v6), text });
    }
    Ok(out)
}

/// True when `VARIANT-save` of family `v6` would print nothing, known without running it (a
/// few milliseconds a process, four per read): iptables-nft prints only tables of the `ip`
/// (`ip6`) nf_tables family, so none when `tables` — the nf_tables tables read over netlink,
/// `None` when they were not — has no table of that family; the legacy tools print the tables listed in
/// `/proc/thread-self/net/ip{,6}_tables_names` (the calling thread's namespace), so none when
/// that file is absent (no x_tables module) or empty. False whenever unsure: then the tool runs.
pub fn save_would_be_empty(variant: IptVariant, v6: bool, tables: Option<&[(String, String)]>) -> bool {
    match variant {
        IptVariant::Nft => {
            let family = if v6 { "ip6" } else { "ip" };
            tables.is_some_and(|t| !t.iter().any(|(f, _)| f == family))
        }
        IptVariant::Legacy => match legacy_table_names(v6) {
            Ok(names) => names.is_empty(),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        },
    }
}

/// The x_tables tables of the calling thread's network namespace, as the kernel lists them
/// (`/proc/thread-self/net/ip_tables_names`, `ip6_tables_names`); reading them creates none,
/// where a save tool's `-t TABLE` would. Read-only.
pub fn legacy_table_names(v6: bool) -> std::io::Result<Vec<String>> {
    let file = if v6 { "ip6_tables_names" } else { "ip_tables_names" };
    let names = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))?;
    Ok(names.split_whitespace().map(str::to_string).collect())
}

/// `nft list table inet ctguard`, or `None` when the table does not exist.
pub fn ctguard_table_text() -> Result<Option<String>, LiveError> {
    let Ok(nft) = Tool::find("nft") else { return Ok(None) };
    let out = nft.output(&["list", "table", "inet", crate::render::nft_ir::TABLE_NAME], None)?;
    Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Value and writability of each key.
pub fn read_sysctls<'a>(
    keys: impl Iterator<Item = &'a SysctlKey>,
) -> Result<BTreeMap<SysctlKey, LiveSysctl>, LiveError> {
    let mut out = BTreeMap::new();
    for k in keys {
        let value = crate::sysctl::read(k)?;
        out.insert(k.clone(), LiveSysctl { value, writable: value.is_some() && crate::sysctl::writable(k) });
    }
    Ok(out)
}
