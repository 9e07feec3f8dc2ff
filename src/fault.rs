//! Test-only fault points that are not crashes: another writer's change injected between
//! ctguard's read of the ruleset and its commit, so the generation-id compare-and-swap can be
//! shown to refuse (or retry) instead of re-basing silently.
//!
//! A point is active when `CTGUARD_FAULT` names it (a comma-separated list of `POINT` or
//! `POINT*N`, N = fire only the first N times in this process), or on the calling thread
//! inside [`inject`] (what in-process tests use: the variable is process-wide and tests run
//! in parallel). The agent's crash points (`agent::server::FAULT_POINTS`) use the same
//! variable; the names differ.
//!
//! Points: `prepare:foreign-change` (policy prepare, right after its snapshot),
//! `apply:foreign-change` (policy apply, right before the nft batch, after ctguard's own
//! iptables-nft step), `rollback:foreign-change` (policy rollback, between the read of the rules
//! to delete and the batch deleting them), `apply:after-iptables` (policy apply, after its
//! last iptables step: another writer's iptables-nft rule in the raw table, see
//! [`foreign_iptables_change`]), `doctor:between-reads` (the doctor's streamed read, after the
//! chains a NOTRACK acts from and before the filter chains it evaluates: the nft script named
//! by [`NFT_SCRIPT_ENV`], see [`foreign_nft_script`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::backend::exec::Tool;

/// The variable naming fault points.
pub const FAULT_ENV: &str = "CTGUARD_FAULT";

/// The table the injected foreign change creates (a chain is added to it at each injection, so
/// every injection moves the generation id).
pub const FOREIGN_TABLE: &str = "ctguard_foreign_test";

/// The foreign-change points.
pub const FOREIGN_CHANGE_POINTS: &[&str] =
    &["prepare:foreign-change", "apply:foreign-change", "rollback:foreign-change", "apply:after-iptables"];

/// The doctor's point between its reads ([`foreign_nft_script`]).
pub const DOCTOR_BETWEEN_READS: &str = "doctor:between-reads";

/// The variable naming the nft script [`foreign_nft_script`] loads.
pub const NFT_SCRIPT_ENV: &str = "CTGUARD_FAULT_NFT_SCRIPT";

/// The address of the rule [`foreign_iptables_change`] adds.
pub const FOREIGN_IPT_SOURCE: &str = "192.0.2.99/32";

thread_local! {
    static THREAD: RefCell<Vec<(String, usize, usize)>> = const { RefCell::new(Vec::new()) };
}

static ENV_FIRED: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
static INJECTIONS: AtomicUsize = AtomicUsize::new(0);

/// True when `point` fires now (and counts the firing).
pub fn fires(point: &str) -> bool {
    let local = THREAD.with(|t| {
        let mut t = t.borrow_mut();
        match t.iter_mut().rev().find(|(p, _, _)| p == point) {
            Some((_, left, fired)) if *left > 0 => {
                *left -= 1;
                *fired += 1;
                true
            }
            _ => false,
        }
    });
    if local {
        return true;
    }
    let Ok(spec) = std::env::var(FAULT_ENV) else { return false };
    for item in spec.split(',').map(str::trim) {
        let (name, limit) = match item.split_once('*') {
            Some((n, k)) => (n, k.parse::<usize>().ok()),
            None => (item, None),
        };
        if name != point {
            continue;
        }
        let mut g = ENV_FIRED.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.get_or_insert_with(HashMap::new).entry(point.to_string()).or_insert(0);
        if limit.is_some_and(|l| *n >= l) {
            return false;
        }
        *n += 1;
        return true;
    }
    false
}

/// Runs `f` with `point` active on the calling thread for its first `times` arrivals; returns
/// `f`'s result and how often the point fired.
pub fn inject<T>(point: &str, times: usize, f: impl FnOnce() -> T) -> (T, usize) {
    THREAD.with(|t| t.borrow_mut().push((point.to_string(), times, 0)));
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            THREAD.with(|t| {
                t.borrow_mut().pop();
            });
        }
    }
    let pop = Pop;
    let out = f();
    let fired = THREAD.with(|t| t.borrow().last().map_or(0, |e| e.2));
    drop(pop);
    (out, fired)
}

/// At `point`, when it fires: another writer's nft change in the calling thread's namespace
/// (`add table ip ctguard_foreign_test` and a new chain in it, through `nft -f -`). A failure to
/// inject is logged; the test then sees no conflict and fails on its own assertions.
pub fn foreign_change(point: &str) {
    if !fires(point) {
        return;
    }
    let n = INJECTIONS.fetch_add(1, Ordering::Relaxed);
    let script = format!("add table ip {FOREIGN_TABLE}\nadd chain ip {FOREIGN_TABLE} c{n}\n");
    tracing::warn!("fault point {point}: injecting a foreign nft change");
    run_foreign(point, "nft", &["-f", "-"], Some(script.as_bytes()));
}

/// Runs the foreign writer's tool; a failure is logged (the test then sees no conflict and
/// fails on its own assertions).
fn run_foreign(point: &str, tool: &str, args: &[&str], stdin: Option<&[u8]>) {
    if let Err(e) = Tool::find(tool).and_then(|t| t.run(args, stdin)) {
        tracing::error!("fault point {point}: the foreign change failed: {e}");
    }
}

/// At `point`, when it fires: another writer's iptables-nft change in the calling thread's
/// namespace, one that a save shows (`iptables-nft -t raw -A PREROUTING -s`
/// [`FOREIGN_IPT_SOURCE`] `-j ACCEPT`). A failure to inject is logged, as for [`foreign_change`].
pub fn foreign_iptables_change(point: &str) {
    if !fires(point) {
        return;
    }
    INJECTIONS.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("fault point {point}: injecting a foreign iptables-nft change");
    let args = ["-w", "5", "-t", "raw", "-A", "PREROUTING", "-s", FOREIGN_IPT_SOURCE, "-j", "ACCEPT"];
    run_foreign(point, "iptables-nft", &args, None);
}

/// At `point`, when it fires: another writer's change in the calling thread's namespace, the
/// nft script in the file [`NFT_SCRIPT_ENV`] names (loaded with `nft -f -`). A failure to inject is
/// logged, as for [`foreign_change`].
pub fn foreign_nft_script(point: &str) {
    if !fires(point) {
        return;
    }
    INJECTIONS.fetch_add(1, Ordering::Relaxed);
    let Some(path) = std::env::var_os(NFT_SCRIPT_ENV) else {
        tracing::error!("fault point {point}: {NFT_SCRIPT_ENV} is not set");
        return;
    };
    tracing::warn!("fault point {point}: loading {}", std::path::Path::new(&path).display());
    let script = match std::fs::read(&path) {
        Ok(s) => s,
        Err(e) => return tracing::error!("fault point {point}: {}: {e}", std::path::Path::new(&path).display()),
    };
    run_foreign(point, "nft", &["-f", "-"], Some(&script));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_points_fire_the_given_number_of_times_on_this_thread_only() {
        let ((a, b, c, other), fired) = inject("x:test-point", 2, || {
            let other = std::thread::scope(|s| s.spawn(|| fires("x:test-point")).join().unwrap_or(true));
            (fires("x:test-point"), fires("x:test-point"), fires("x:test-point"), other)
        });
        assert_eq!((a, b, c, other, fired), (true, true, false, false, 2));
        assert!(!fires("x:test-point"), "inactive outside inject");
    }
}
