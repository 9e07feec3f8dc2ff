//! The iptables tools, run in the calling thread's network namespace (DESIGN §1): save,
//! restore (always `-w SECONDS`: a bounded wait for the xtables lock), `-C` checks, and the kernel check of a candidate in a scratch
//! namespace (`iptables-restore --test` never reaches the kernel).
//!
//! Tools are run by absolute path with argument vectors ([`Tool`]); nothing goes through a
//! shell. Call these inside `crate::netns::Target::run` so they act on the target.

use crate::backend::exec::{xtables_wait_args, ExecError, Tool, BULK_TIMEOUT};
use crate::live::iptables_save::{self, SaveDump, SaveParseError};
use crate::render::iptables::{IpFamily, Jump};

/// Which iptables implementation (one type for the whole crate, see [`IptVariant`](crate::live::fw::IptVariant)).
pub use crate::live::fw::IptVariant as Variant;

/// Errors of the iptables backend.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The scratch check refused the live rules and the document in one run but accepted them
    /// in two: no verdict (treated as a refusal).
    #[error("{tool}: the scratch check refused the live rules and the document together but not apart")]
    ScratchInconsistent {
        /// The restore tool.
        tool: String,
    },
    /// A tool could not be found, started, or it failed.
    #[error("{what}")]
    Exec {
        /// What ctguard was doing.
        what: String,
        /// The tool's failure.
        #[source]
        source: ExecError,
    },
    /// A save printed a dump ctguard cannot use (e.g. iptables-nft's "incompatible" warning,
    /// printed on stdout with exit status 0).
    #[error("{tool} printed an unusable dump")]
    Dump {
        /// The save tool.
        tool: String,
        /// What is wrong with it.
        #[source]
        source: SaveParseError,
    },
    /// `-C` ended with a status other than 0 (found) or 1 (not found).
    #[error("{cmd} failed ({status}): {stderr}")]
    Check {
        /// The command, for the message.
        cmd: String,
        /// Exit status text.
        status: String,
        /// Its stderr on one line.
        stderr: String,
    },
    /// The scratch namespace could not be created.
    #[error("cannot create a scratch network namespace")]
    Unshare {
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The target's ipsets could not be recreated in the scratch namespace.
    #[error("scratch namespace: recreating the ipsets from `ipset save` failed")]
    ScratchIpsets {
        /// The `ipset restore` failure.
        #[source]
        source: ExecError,
    },
    /// The live dump itself does not load into a fresh namespace (so the candidate cannot be
    /// judged against it).
    #[error("scratch namespace: the live {tool} dump does not load")]
    ScratchLive {
        /// The restore tool.
        tool: String,
        /// The restore failure.
        #[source]
        source: ExecError,
    },
    /// The kernel refused the candidate on top of the live rules in the scratch namespace.
    #[error("the kernel refuses the candidate ({tool} --noflush in a scratch namespace)")]
    Rejected {
        /// The restore tool.
        tool: String,
        /// The restore failure (its stderr names the line).
        #[source]
        source: ExecError,
    },
    /// The kernel refused what [`scratch_check_then`] checked after loading the candidate.
    #[error("the kernel refuses {what} in a scratch namespace: {detail}")]
    RejectedAfter {
        /// What was checked.
        what: String,
        /// The kernel's answer.
        detail: String,
    },
    /// The scratch thread died.
    #[error("the scratch-namespace thread panicked")]
    ScratchPanicked,
    /// The thread reading a save died.
    #[error("the thread running {tool} panicked")]
    SavePanicked {
        /// The save tool.
        tool: String,
    },
}

fn tool(name: &str) -> Result<Tool, IptablesError> {
    Tool::find(name).map_err(|source| IptablesError::Exec { what: format!("cannot use {name}"), source })
}

/// `iptables-VARIANT-save` (or `ip6tables-…`) of the calling thread's namespace. The text is
/// parsed before it is returned: a dump iptables-nft marks as incomplete ("table … is
/// incompatible, use 'nft' tool") is an error, though the tool exits 0.
pub fn save(variant: Variant, family: IpFamily) -> Result<String, IptablesError> {
    // A shared save was parsed when it was kept (or computed, see [`seed_save`]): it is not
    // parsed again (a 100k-rule save takes tens of milliseconds).
    if let Some(text) = save_cache::on().then(|| seeded_save(variant, family)).flatten() {
        return Ok(text);
    }
    save_parsed(variant, family).map(|(text, _)| text)
}

/// [`save`], returning the parsed dump as well.
///
/// Between [`share_saves`]`(true)` and `(false)` on this thread, a save is taken again only
/// when it may differ from the last one of that variant and family in this namespace: for
/// iptables-nft when the nf_tables generation id moved (its tables are nf_tables tables: an
/// unchanged id means an unchanged dump); for iptables-legacy, which has no such id, never (the
/// caller shares a legacy save only between steps a moment apart: apply's listing after the
/// commit and the rollback check that follows it).
pub fn save_parsed(variant: Variant, family: IpFamily) -> Result<(String, SaveDump), IptablesError> {
    let name = variant.tool(family == IpFamily::V6, "-save");
    let t = tool(&name)?;
    let at = save_cache::on().then(|| save_cache::key(variant)).flatten();
    if let Some(text) = at.and_then(|k| save_cache::get(k, family)) {
        let dump = iptables_save::parse(&text).map_err(|source| IptablesError::Dump { tool: name, source })?;
        return Ok((text, dump));
    }
    let (text, dump) = read_save(&t, &name)?;
    // Kept (parsed) only when nothing committed while the tool read.
    if let Some(k) = at.filter(|k| save_cache::key(variant) == Some(*k)) {
        save_cache::put(k, family, &text);
    }
    Ok((text, dump))
}

/// One run of the save tool `t` (`name`), parsed; no sharing.
fn read_save(t: &Tool, name: &str) -> Result<(String, SaveDump), IptablesError> {
    let raw = t.run(&[], None).map_err(|source| IptablesError::Exec { what: format!("{name} failed"), source })?;
    // Native nft tables with iptables-like names are nft's, not this tool's (DESIGN §1).
    let (text, _native) = iptables_save::without_incompatible(&raw);
    let dump = iptables_save::parse(&text).map_err(|source| IptablesError::Dump { tool: name.to_string(), source })?;
    Ok((text, dump))
}

/// [`save`] of each (variant, family) of `which`, in that order, the tools run side by side
/// (each mostly waits on its own start-up and the kernel): threads of this one, in its
/// namespace. Shared saves ([`share_saves`]) are used and kept as [`save`] would.
pub fn saves_at_once(which: &[(Variant, IpFamily)]) -> Vec<Result<String, IptablesError>> {
    let keys: Vec<Option<save_cache::Key>> =
        which.iter().map(|(v, _)| save_cache::on().then(|| save_cache::key(*v)).flatten()).collect();
    let read: Vec<Option<Result<String, IptablesError>>> = std::thread::scope(|s| {
        let handles: Vec<_> = which
            .iter()
            .zip(&keys)
            .map(|(&(v, f), k)| {
                let kept = k.and_then(|k| save_cache::get(k, f));
                match kept {
                    Some(text) => Err(text),
                    None => Ok(s.spawn(move || {
                        let name = v.tool(f == IpFamily::V6, "-save");
                        read_save(&tool(&name)?, &name).map(|(text, _)| text)
                    })),
                }
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Err(kept) => Some(Ok(kept)),
                Ok(h) => h.join().ok(),
            })
            .collect()
    });
    which
        .iter()
        .zip(keys)
        .zip(read)
        .map(|((&(v, f), k), r)| {
            let r =
                r.unwrap_or_else(|| Err(IptablesError::SavePanicked { tool: v.tool(f == IpFamily::V6, "-save") }))?;
            if let Some(k) = k.filter(|k| save_cache::key(v) == Some(*k)) {
                save_cache::put(k, f, &r);
            }
            Ok(r)
        })
        .collect()
}

/// Turns the sharing of saves on this thread on or off (see [`save_parsed`]); off forgets the
/// saves kept.
pub fn share_saves(on: bool) {
    save_cache::set(on);
}

/// Hands `text` to the save sharing of [`share_saves`] as what `variant`'s save of `family`
/// prints now (this thread's namespace, and for iptables-nft the generation id read now): the
/// caller proved it (see `policy_txn::apply`). Legacy has no generation id to key it on and
/// is never seeded. Debug builds take the save anyway and panic when it differs (`#` lines
/// and counters aside): the tests check every seeded save against the tool.
pub fn seed_save(variant: Variant, family: IpFamily, text: &str) {
    if variant != Variant::Nft {
        return;
    }
    let Some(k) = save_cache::key(variant) else { return };
    #[cfg(debug_assertions)]
    {
        use crate::render::ipt_edit::normalize_save;
        let name = variant.tool(family == IpFamily::V6, "-save");
        if let Ok(real) = tool(&name).and_then(|t| {
            t.run(&[], None).map_err(|source| IptablesError::Exec { what: format!("{name} failed"), source })
        }) {
            let (real, _) = iptables_save::without_incompatible(&real);
            // (Unless another writer committed meanwhile: then the seed is never used.)
            let unchanged = save_cache::key(variant) == Some(k);
            assert!(
                !unchanged || normalize_save(text) == normalize_save(&real),
                "the computed {name} output differs from the tool's:\n--- computed\n{text}--- {name}\n{real}"
            );
        }
    }
    save_cache::put(k, family, text);
}

/// The save of `variant`/`family` kept for sharing on this thread — handed over by
/// [`seed_save`], or read by the tool while sharing was on — that still holds now (same
/// namespace, and for iptables-nft the same generation id), if any. Read-only.
pub fn seeded_save(variant: Variant, family: IpFamily) -> Option<String> {
    save_cache::key(variant).and_then(|k| save_cache::get(k, family))
}

/// The last save of each variant and family on this thread, with the namespace (and for
/// iptables-nft the nf_tables generation id) it was taken at.
mod save_cache {
    use std::cell::RefCell;

    use super::Variant;
    use crate::render::iptables::IpFamily;

    /// (variant, namespace device, namespace inode, generation id for iptables-nft).
    pub type Key = (Variant, u64, u64, Option<u32>);

    thread_local! {
        static SAVES: RefCell<Vec<(Key, IpFamily, String)>> = const { RefCell::new(Vec::new()) };
        static ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    pub fn on() -> bool {
        ON.with(std::cell::Cell::get)
    }

    pub fn set(on: bool) {
        ON.with(|o| o.set(on));
        if !on {
            SAVES.with(|s| s.borrow_mut().clear());
        }
    }

    /// This thread's namespace (and for iptables-nft its generation id) now; `None` when it
    /// cannot be read.
    pub fn key(variant: Variant) -> Option<Key> {
        let (dev, ino) = crate::netns::current_id()?;
        let genid = match variant {
            Variant::Nft => Some(crate::backend::netlink::get_genid().ok()?),
            Variant::Legacy => None,
        };
        Some((variant, dev, ino, genid))
    }

    pub fn get(k: Key, family: IpFamily) -> Option<String> {
        SAVES.with(|s| s.borrow().iter().find(|(x, f, _)| *x == k && *f == family).map(|(_, _, t)| t.clone()))
    }

    pub fn put(k: Key, family: IpFamily, text: &str) {
        SAVES.with(|s| {
            let mut s = s.borrow_mut();
            s.retain(|(x, f, _)| !(x.0 == k.0 && *f == family));
            s.push((k, family, text.to_string()));
        });
    }
}

/// Loads `text` with `iptables-VARIANT-restore -w SECONDS` ([`xtables_wait_args`]; plus `--noflush` when asked). Tables are
/// committed one by one, in the order of the text.
pub fn restore(variant: Variant, family: IpFamily, text: &str, noflush: bool) -> Result<(), IptablesError> {
    let name = variant.tool(family == IpFamily::V6, "-restore");
    restore_with(&tool(&name)?, text, noflush, &xtables_wait_args())
        .map_err(|source| IptablesError::Exec { what: format!("{name} failed"), source })
}

/// `wait`: [`xtables_wait_args`] of the thread that asked (scratch checks run on another one).
fn restore_with(t: &Tool, text: &str, noflush: bool, wait: &[String; 2]) -> Result<(), ExecError> {
    let mut args: Vec<&str> = wait.iter().map(String::as_str).collect();
    if noflush {
        args.push("--noflush");
    }
    t.run_timeout(&args, Some(text.as_bytes()), BULK_TIMEOUT).map(|_| ())
}

/// `iptables-VARIANT -w SECONDS -t TABLE -C CHAIN SPEC…`: `Ok(true)` when the rule exists, `Ok(false)`
/// when it does not (exit 1; also what both variants answer for a chain that does not exist).
/// Any other status (2: bad arguments, e.g. a jump to a chain that does not exist; 4:
/// resource problem) is an error.
pub fn check_rule(
    variant: Variant,
    family: IpFamily,
    table: &str,
    chain: &str,
    spec: &[String],
) -> Result<bool, IptablesError> {
    let name = variant.tool(family == IpFamily::V6, "");
    let t = tool(&name)?;
    let wait = xtables_wait_args();
    let mut args: Vec<&str> = wait.iter().map(String::as_str).collect();
    args.extend(["-t", table, "-C", chain]);
    args.extend(spec.iter().map(String::as_str));
    let out =
        t.output(&args, None).map_err(|source| IptablesError::Exec { what: format!("{name} -C failed"), source })?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(IptablesError::Check {
            cmd: format!("{} {}", name, args.join(" ")),
            status: out.status.to_string(),
            stderr: crate::backend::exec::one_line(&String::from_utf8_lossy(&out.stderr)),
        }),
    }
}

/// The jumps of `jumps` not present in the calling thread's namespace, i.e. those the restore
/// text must insert. A jump whose target chain does not exist yet is missing (there `-C`
/// itself fails with status 2: "Chain 'CTGUARD-PRE' does not exist" / "Couldn't load target");
/// otherwise `-C` decides. Another writer adding the same jump between this check and the
/// restore would leave two; rollback deletes every copy (`-D` until `-C` finds none).
pub fn missing_jumps(variant: Variant, family: IpFamily, jumps: &[Jump]) -> Result<Vec<Jump>, IptablesError> {
    let (_, dump) = save_parsed(variant, family)?;
    let mut missing = Vec::new();
    for j in jumps {
        let exists = dump.chain(j.table, j.to).is_some() && check_rule(variant, family, j.table, j.from, &j.spec())?;
        if !exists {
            missing.push(j.clone());
        }
    }
    Ok(missing)
}

/// Kernel-checks `candidate` (restore text meant for `--noflush`) against the live rules
/// without touching the target (DESIGN §1): on a new thread, in a fresh network namespace
/// that vanishes with it, recreates the ipsets from `ipset_save` (`ipset restore`), loads
/// `live_dump` (a save of the target, same variant and family), then `candidate` with
/// `--noflush`. The kernel validates every rule (table/hook restrictions of targets and
/// matches, ipset references, loops), which `iptables-restore --test` does not.
///
/// The calling thread's namespace — the target — is never entered or changed.
pub fn scratch_check(
    variant: Variant,
    family: IpFamily,
    live_dump: &str,
    ipset_save: Option<&str>,
    candidate: &str,
) -> Result<(), IptablesError> {
    scratch_check_then(variant, family, live_dump, ipset_save, candidate, "nothing more", || Ok(()))
}

/// [`scratch_check`], then, in the same scratch namespace and on the same thread, `then`: a
/// further check the caller makes on the state the candidate left (iptables-nft's rollback as
/// one nf_tables batch). `then`'s error, named `what`, is a refusal
/// ([`IptablesError::RejectedAfter`]). Changes nothing in the target.
pub fn scratch_check_then(
    variant: Variant,
    family: IpFamily,
    live_dump: &str,
    ipset_save: Option<&str>,
    candidate: &str,
    what: &str,
    then: impl FnOnce() -> Result<(), String> + Send,
) -> Result<(), IptablesError> {
    let name = variant.tool(family == IpFamily::V6, "-restore");
    let restore_tool = tool(&name)?;
    let ipset_tool = match ipset_save {
        Some(s) if !s.trim().is_empty() => Some((tool("ipset")?, s)),
        _ => None,
    };
    let wait = xtables_wait_args();
    std::thread::scope(|s| {
        let h = s.spawn(|| -> Result<(), IptablesError> {
            enter_scratch(ipset_tool.as_ref())?;
            let both = if live_dump.trim().is_empty() {
                candidate.to_string()
            } else {
                format!("{live_dump}{}{candidate}", if live_dump.ends_with('\n') { "" } else { "\n" })
            };
            if restore_with(&restore_tool, &both, true, &wait).is_err() {
                return Err(scratch_apart(&restore_tool, &name, live_dump, candidate, ipset_tool.as_ref(), &wait));
            }
            then().map_err(|detail| IptablesError::RejectedAfter { what: what.to_string(), detail })
        });
        h.join().map_err(|_| IptablesError::ScratchPanicked)?
    })
}

/// Moves the calling thread (a thread of its own: the namespace is freed when it and the tools
/// it started are gone) into a fresh network namespace and recreates `ipsets` there.
fn enter_scratch(ipsets: Option<&(Tool, &str)>) -> Result<(), IptablesError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| IptablesError::Unshare { source })?;
    if let Some((ipset, text)) = ipsets {
        ipset.run(&["restore"], Some(text.as_bytes())).map_err(|source| IptablesError::ScratchIpsets { source })?;
    }
    Ok(())
}

/// [`scratch_check`]'s failure path: in another fresh namespace, `live_dump` then `candidate`,
/// each in its own tool run, so the error names the one the kernel refused.
fn scratch_apart(
    restore_tool: &Tool,
    name: &str,
    live_dump: &str,
    candidate: &str,
    ipsets: Option<&(Tool, &str)>,
    wait: &[String; 2],
) -> IptablesError {
    let run = || -> Result<(), IptablesError> {
        enter_scratch(ipsets)?;
        restore_with(restore_tool, live_dump, false, wait)
            .map_err(|source| IptablesError::ScratchLive { tool: name.to_string(), source })?;
        restore_with(restore_tool, candidate, true, wait)
            .map_err(|source| IptablesError::Rejected { tool: name.to_string(), source })
    };
    match std::thread::scope(|s| s.spawn(run).join()) {
        Ok(Err(e)) => e,
        Ok(Ok(())) => IptablesError::ScratchInconsistent { tool: name.to_string() },
        Err(_) => IptablesError::ScratchPanicked,
    }
}

/// `ipset save` of the calling thread's namespace (for [`scratch_check`]).
pub fn ipset_save() -> Result<String, IptablesError> {
    tool("ipset")?
        .run(&["save"], None)
        .map_err(|source| IptablesError::Exec { what: "ipset save failed".into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        assert_eq!(Variant::Nft.tool(false, "-save"), "iptables-nft-save");
        assert_eq!(Variant::Legacy.tool(true, "-restore"), "ip6tables-legacy-restore");
        assert_eq!(Variant::Legacy.tool(true, ""), "ip6tables-legacy");
    }
}
