//! "Run ctguard as root" where the lack of privilege is the cause (exit 2).
//!
//! Every verb but `render`, `man` and `completions` (and `--help`, `--version`) needs root:
//! the journal and the agent's socket are root's, and reading or changing a firewall needs
//! CAP_NET_ADMIN, entering a namespace CAP_SYS_ADMIN. Those verbs are refused at once, before
//! anything is read, when the effective uid is not 0; `plan` first validates the policy (that
//! needs no privilege) and is refused before it reads the live state. A root without those
//! capabilities (a container, a user namespace) gets the kernel's EPERM/EACCES, which are then
//! turned into the same exit 2 with the same advice.

use super::args::Command;
use crate::exit::{Exit, Failure};

/// The words every privilege failure carries.
pub(crate) const RUN_AS_ROOT: &str = "run ctguard as root";

/// CAP_NET_ADMIN and CAP_SYS_ADMIN (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The verb's name as typed.
fn verb_name(c: &Command) -> &'static str {
    match c {
        Command::Plan(_) => "plan",
        Command::Render(_) => "render",
        Command::Apply(_) => "apply",
        Command::Confirm(_) => "confirm",
        Command::Extend { .. } => "extend",
        Command::Rollback(_) => "rollback",
        Command::Status => "status",
        Command::History => "history",
        Command::Show(_) => "show",
        Command::Doctor(_) => "doctor",
        Command::Agent(_) => "agent",
        Command::Recover => "recover",
        Command::Restore(_) => "restore",
        Command::Man(_) => "man",
        Command::Completions(_) => "completions",
    }
}

/// The refusal for `verb` run with effective uid `uid`.
fn not_root(verb: &str, uid: u32, why: &str) -> Failure {
    Failure::bad_input(format!("{verb} needs root ({why}; effective uid {uid}): {RUN_AS_ROOT}"))
}

/// Refuses, with exit 2, a verb that needs root when the effective uid is not 0. `render`,
/// `man` and `completions` need nothing; `plan` is checked by [`require_root_for_plan`] once
/// its policy is validated.
pub(crate) fn check_root(command: &Command) -> Result<(), Vec<Failure>> {
    let why = match command {
        Command::Render(_) | Command::Man(_) | Command::Completions(_) | Command::Plan(_) => return Ok(()),
        Command::Status | Command::History | Command::Show(_) | Command::Recover => {
            "it reads the journal, which is root's, and asks the agent"
        }
        Command::Doctor(_) => "it reads the conntrack table and the netfilter counters",
        Command::Agent(_) => "it changes firewalls and sysctls",
        _ => "it talks to the agent, which serves root only, and changes the firewall",
    };
    let uid = euid();
    if uid == 0 {
        return Ok(());
    }
    Err(vec![not_root(verb_name(command), uid, why)])
}

/// `plan`'s check, after the policy is validated and before the live state is read
/// (`ctguard render` shows what a policy becomes without root).
pub(crate) fn require_root_for_plan() -> Result<(), Vec<Failure>> {
    let uid = euid();
    if uid == 0 {
        return Ok(());
    }
    Err(vec![not_root(
        "plan",
        uid,
        "it reads the live firewall and sysctls of the target; 'ctguard render' needs no root",
    )])
}

/// True when this process has what ctguard needs: effective uid 0, CAP_NET_ADMIN and
/// CAP_SYS_ADMIN, in the initial user namespace (root in another user namespace cannot enter
/// the host's network namespaces).
fn fully_privileged() -> bool {
    if euid() != 0 {
        return false;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let initial_userns = uid_map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    has(CAP_NET_ADMIN) && has(CAP_SYS_ADMIN) && initial_userns
}

/// True when `message` reports a permission error from the kernel.
fn is_permission_error(message: &str) -> bool {
    ["EPERM", "EACCES", "Operation not permitted", "Permission denied", "permission denied"]
        .iter()
        .any(|w| message.contains(w))
}

/// The failures of a verb, with every permission error turned into exit 2 and
/// [`RUN_AS_ROOT`] when this process lacks privilege (see [`fully_privileged`]); unchanged
/// otherwise (a fully privileged root that gets EPERM met something else: a read-only sysctl
/// in a namespace, a security module).
pub(crate) fn explain(failures: Vec<Failure>) -> Vec<Failure> {
    if !failures.iter().any(|f| is_permission_error(&f.message) && !f.message.contains(RUN_AS_ROOT))
        || fully_privileged()
    {
        return failures;
    }
    failures
        .into_iter()
        .map(|f| {
            if f.exit == Exit::Ok || !is_permission_error(&f.message) || f.message.contains(RUN_AS_ROOT) {
                return f;
            }
            Failure::bad_input(format!(
                "{}: {RUN_AS_ROOT} (uid 0 with CAP_NET_ADMIN and CAP_SYS_ADMIN in the initial user namespace)",
                f.message
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_are_recognized() {
        assert!(is_permission_error("cannot enter network namespace /run/netns/x: EPERM: Operation not permitted"));
        assert!(is_permission_error("/proc/sys/net/netfilter/nf_conntrack_max: Permission denied (os error 13)"));
        assert!(!is_permission_error("no transaction 20261204-031331-7199"));
    }
}
