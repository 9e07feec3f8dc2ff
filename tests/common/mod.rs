//! Helpers shared by the golden and planner fixture tests: running tools, a fresh network
//! namespace per check, the bless switch.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn tool(name: &str) -> PathBuf {
    ctguard::backend::exec::Tool::find(name).unwrap_or_else(|e| panic!("{e}")).path
}

pub fn run(tool_name: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(tool(tool_name))
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {tool_name}: {e}"));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes());
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("{tool_name}: {e}"))
}

pub fn run_ok(tool_name: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(tool_name, args, stdin);
    assert!(
        out.status.success(),
        "{tool_name} {} failed ({}):\n{}\ninput:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        stdin.unwrap_or("")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a new thread that first moved into a network namespace of its own; the thread
/// (and the namespace, which nothing else holds) ends when `f` returns. Panics in `f` are
/// passed on to the caller.
pub fn in_fresh_netns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let what = what.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{what}"))
        .spawn(move || {
            let before = fs::read_link("/proc/thread-self/ns/net").expect("read own netns");
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("{what}: unshare(CLONE_NEWNET): {e}"));
            let after = fs::read_link("/proc/thread-self/ns/net").expect("read own netns");
            // Never run a tool in the namespace we started in.
            assert_ne!(before, after, "{what}: unshare did not give this thread a new namespace");
            f()
        })
        .expect("spawn namespace thread");
    match handle.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

pub fn require_root(test: &str) {
    assert!(is_root(), "{test}: needs root (network namespaces and netfilter); run the suite as README.md says");
}

pub fn bless() -> bool {
    std::env::var_os("CTGUARD_BLESS").is_some_and(|v| v == "1")
}

/// Where two texts first differ, as a short report.
pub fn first_difference(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    for i in 0..e.len().max(a.len()) {
        let (x, y) = (e.get(i), a.get(i));
        if x != y {
            return format!(
                "first difference at line {}:\n  expected: {}\n  actual:   {}",
                i + 1,
                x.map_or("<end of file>".to_string(), |s| format!("{s:?}")),
                y.map_or("<end of file>".to_string(), |s| format!("{s:?}")),
            );
        }
    }
    "texts differ only in the final newline".to_string()
}
