//! End-to-end policy transactions through the real binary and a real (detached) agent: apply,
//! dead-man rollback, confirm, rollback now, busy target, SIGTERM, kill -9 + recovery, a
//! simulated reboot. Each test has its own namespace, state dir and run dir (so its own agent).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::{udp_queries, Ns, Pair, UdpResponder, CLI4, SRV4, STATEFUL};

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One ctguard installation: its own state and run dirs (hence its own agent).
pub(crate) struct Ctg {
    pub(crate) base: PathBuf,
    pub(crate) env: Vec<(String, String)>,
}

impl Ctg {
    pub(crate) fn new() -> Ctg {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let base = std::env::temp_dir().join(format!("ctguard-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        Ctg { base, env: Vec::new() }
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    pub(crate) fn run_env(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        let state = self.base.join("state");
        let run = self.base.join("run");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctguard"));
        cmd.arg("--state-dir").arg(&state).arg("--run-dir").arg(&run).args(args).env_remove("SSH_CONNECTION");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().expect("run ctguard")
    }

    /// `ctguard --json ARGS`: the whole envelope `{"exit", "error", "data"}` every verb prints.
    pub(crate) fn envelope(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        envelope_of(&out, args)
    }

    /// `ctguard --json ARGS`: what the verb reports, the envelope's `data` (`null` on a failure
    /// that has none; [`Ctg::envelope`] for the exit code and the error).
    pub(crate) fn json(&self, args: &[&str]) -> Value {
        self.envelope(args)["data"].take()
    }

    /// `apply --json` and the txid.
    pub(crate) fn apply(&self, ns: &Ns, extra: &[&str]) -> (Output, String) {
        let mut args = vec!["--json", "apply", "--netns", ns.name()];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let id = v["data"]["txid"].as_str().unwrap_or_default().to_string();
        (out, id)
    }

    pub(crate) fn state(&self, txid: &str) -> String {
        let v = self.json(&["show", txid]);
        v["state"].as_str().unwrap_or_default().to_string()
    }

    pub(crate) fn outcome(&self, txid: &str) -> String {
        self.json(&["show", txid])["outcome"].as_str().unwrap_or_default().to_string()
    }

    pub(crate) fn wait_state(&self, txid: &str, want: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            let s = self.state(txid);
            if s == want {
                return;
            }
            assert!(start.elapsed() < limit, "{txid} is {s}, not {want}, after {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn agent_pid(&self) -> Option<i32> {
        let v = self.json(&["status"]);
        v["agent_pid"].as_i64().map(|p| p as i32)
    }

    /// Sends `sig` to this installation's agent; returns its pid.
    pub(crate) fn signal_agent(&self, sig: Signal) -> i32 {
        let pid = self.agent_pid().expect("agent pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
        pid
    }
}

/// The one JSON envelope on `out`'s stdout, checked for its shape: `exit` (the process's exit
/// code), `error` (null exactly on success) and `data`, nothing else.
pub(crate) fn envelope_of(out: &Output, what: &[&str]) -> Value {
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{what:?}: {e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    let keys: Vec<&String> = v.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    assert_eq!(keys, ["data", "error", "exit"], "{what:?}: not the envelope: {v}");
    assert_eq!(v["exit"].as_i64().map(|c| c as i32), out.status.code(), "{what:?}: {v}");
    assert_eq!(v["error"].is_null(), out.status.success(), "{what:?}: {v}");
    v
}

/// Waits until `pid` has exited (gone or a zombie).
pub(crate) fn wait_gone(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(s) if s.contains(") Z") => return true,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

impl Drop for Ctg {
    fn drop(&mut self) {
        // Roll back whatever is still pending, stop the agent, remove the dirs.
        let v = self.json(&["status"]);
        for p in v["pending"].as_array().into_iter().flatten() {
            if let Some(id) = p["id"].as_str() {
                let _ = self.run(&["rollback", id]);
            }
        }
        if let Some(pid) = self.agent_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
            if !wait_gone(pid, Duration::from_secs(5)) {
                // Still rolling back (a loaded machine): it would write into the dirs removed
                // below and leave them behind.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                wait_gone(pid, Duration::from_secs(5));
            }
        }
        // Pins of transactions closed without the agent (none should be left; be tidy anyway).
        for e in std::fs::read_dir(self.base.join("run/ns")).into_iter().flatten().flatten() {
            ctguard::netns::unpin(&e.path());
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

pub(crate) fn ok(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn apply_without_confirm_rolls_back_to_the_identical_ruleset() {
    let pair = Pair::new("e2e");
    pair.srv.nft(STATEFUL);
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let before = pair.srv.nft_list();
    let ctg = Ctg::new();
    let t0 = Instant::now();
    let (out, id) = ctg.apply(&pair.srv, &["--timeout", "3s"]);
    let took = t0.elapsed();
    ok(&out);
    // apply returns at once: the detached agent holds none of our pipes.
    assert!(took < Duration::from_secs(3), "apply took {took:?}");
    let during = pair.srv.nft_list();
    assert!(during.contains("table inet ctguard"), "{during}");
    assert!(during.contains("ct state untracked accept"), "{during}");
    let status = ctg.json(&["status"]);
    assert_eq!(status["pending"][0]["id"].as_str(), Some(id.as_str()), "{status}");
    // The change works while pending: answered, (almost) no conntrack entries.
    pair.srv.conntrack_flush();
    let base = pair.srv.conntrack_count();
    let a = udp_queries(&pair.cli, (SRV4, 53).into(), 300, 20000);
    let added = pair.srv.conntrack_count().saturating_sub(base);
    eprintln!("pending: {}/{} answered, {added} entries added", a.answered, a.sent);
    assert_eq!(a.answered, 300);
    assert!(added <= 5, "{added}");
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(30));
    assert_eq!(ctg.outcome(&id), "rolled back: deadline");
    assert_eq!(pair.srv.nft_list(), before, "the ruleset differs after the rollback");
    let _ = CLI4;
}

#[test]
fn confirm_keeps_and_reapply_replaces_then_rollback_restores_the_committed_one() {
    let ns = Ns::new("e2econf");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let (out, a) = ctg.apply(&ns, &["--timeout", "2s"]);
    ok(&out);
    ok(&ctg.run(&["confirm", &a]));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(ctg.state(&a), "COMMITTED");
    let committed = ns.nft_list();
    assert!(committed.contains("table inet ctguard"));
    // A second policy replaces the committed one; its rollback restores the committed one.
    let dir = ctg.base.join("p");
    std::fs::create_dir_all(&dir).expect("dir");
    let policy = dir.join("b.toml");
    std::fs::write(&policy, "[[notrack]]\nprotocols = [\"udp\"]\nports = [5353]\n").expect("write");
    let (out, b) = ctg.apply(&ns, &["--timeout", "60s", policy.to_str().expect("utf8")]);
    ok(&out);
    let during = ns.nft_list();
    assert!(during.contains("5353"), "{during}");
    ok(&ctg.run(&["rollback", &b]));
    assert_eq!(ctg.state(&b), "ROLLED_BACK");
    assert_eq!(ns.nft_list(), committed);
}

/// Every transaction verb under `--json` prints the one envelope (checked by
/// [`Ctg::envelope`]), on success and on failure; with stdout closed (`| head -c1`) a verb
/// still does its work and exits as it would have, quietly.
#[test]
fn json_has_one_shape_and_a_closed_stdout_changes_no_outcome_for_transaction_verbs() {
    let ns = Ns::new("envelope");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let v = ctg.envelope(&["apply", "--netns", ns.name(), "--timeout", "60s"]);
    let a = v["data"]["txid"].as_str().expect("txid").to_string();
    assert_eq!(v["data"]["state"], "PENDING", "{v}");
    let st = ctg.envelope(&["status"]);
    assert_eq!(st["data"]["pending"][0]["id"].as_str(), Some(a.as_str()), "{st}");
    let busy = ctg.envelope(&["apply", "--netns", ns.name(), "--timeout", "60s"]);
    assert_eq!(busy["exit"], 4, "{busy}");
    assert!(busy["error"].as_str().is_some_and(|e| e.contains(&a)), "{busy}");
    let ext = ctg.envelope(&["extend", "--by", "2m", &a]);
    assert!(ext["data"]["seconds_left"].as_u64().is_some_and(|s| s > 100), "{ext}");
    let c = ctg.envelope(&["confirm", &a]);
    assert_eq!(c["data"]["txid"].as_str(), Some(a.as_str()), "{c}");
    let again = ctg.envelope(&["rollback", &a]);
    assert_ne!(again["exit"], 0, "a committed transaction cannot be rolled back: {again}");
    let unknown = ctg.envelope(&["confirm", "20261204-031331-7199"]);
    assert_eq!(unknown["exit"], 2, "{unknown}");
    // stdout closed before a byte is read: the apply happens and exits 0, without a panic.
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .arg("--state-dir")
        .arg(ctg.base.join("state"))
        .arg("--run-dir")
        .arg(ctg.base.join("run"))
        .args(["apply", "--netns", ns.name(), "--timeout", "60s"])
        .env_remove("SSH_CONNECTION")
        .stdout(std::process::Stdio::from(write))
        .output()
        .expect("apply");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let pending = ctg.json(&["status"])["pending"].clone();
    let b = pending[0]["id"].as_str().expect("the apply is pending").to_string();
    let r = ctg.envelope(&["rollback", &b]);
    assert_eq!(r["data"]["txid"].as_str(), Some(b.as_str()), "{r}");
    let h = ctg.envelope(&["history"]);
    let ids: Vec<&str> =
        h["data"]["transactions"].as_array().into_iter().flatten().filter_map(|t| t["id"].as_str()).collect();
    assert_eq!(ids, [a.as_str(), b.as_str()], "{h}");
    let shown = ctg.envelope(&["show", &b]);
    assert_eq!(shown["data"]["state"], "ROLLED_BACK", "{shown}");
    // a is committed: its objects stay (the namespace goes with the test).
    assert_ne!(ns.nft_list(), before);
}

#[test]
fn second_apply_is_busy_and_rollback_is_immediate() {
    let ns = Ns::new("e2ebusy");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s"]);
    ok(&out);
    let (out2, _) = ctg.apply(&ns, &["--timeout", "60s"]);
    assert_eq!(out2.status.code(), Some(4), "{}", String::from_utf8_lossy(&out2.stderr));
    assert!(String::from_utf8_lossy(&out2.stderr).contains(&id));
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ns.nft_list(), before);
}

#[test]
fn lint_error_refuses_unless_forced_and_host_only_sysctl_is_exit_2() {
    let ns = Ns::new("e2elint");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let dir = ctg.base.join("p");
    std::fs::create_dir_all(&dir).expect("dir");
    let bh = dir.join("blackhole.toml");
    std::fs::write(&bh, "[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\naccept_untracked = false\n").expect("write");
    let (out, _) = ctg.apply(&ns, &["--timeout", "60s", bh.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ns.nft_list(), before);
    let sys = dir.join("sysctl.toml");
    std::fs::write(&sys, "[sysctl]\n\"net.netfilter.nf_conntrack_max\" = 1048576\n").expect("write");
    let (out, _) = ctg.apply(&ns, &["--timeout", "60s", sys.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ns.nft_list(), before);
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s", "--force", bh.to_str().expect("utf8")]);
    ok(&out);
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ns.nft_list(), before);
}

#[test]
fn sigterm_rolls_back_before_the_agent_exits() {
    let ns = Ns::new("e2eterm");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s"]);
    ok(&out);
    // SIGHUP changes nothing.
    let pid = ctg.signal_agent(Signal::SIGHUP);
    assert!(!wait_gone(pid, Duration::from_millis(300)), "SIGHUP killed the agent");
    assert_eq!(ctg.state(&id), "PENDING");
    ctg.signal_agent(Signal::SIGTERM);
    assert!(wait_gone(pid, Duration::from_secs(30)), "agent did not exit");
    assert_eq!(ns.nft_list(), before);
    assert_eq!(ctg.outcome(&id), "rolled back: agent stopping");
}

#[test]
fn kill_9_then_any_verb_starts_an_agent_that_recovers() {
    let ns = Ns::new("e2ekill");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "3s"]);
    ok(&out);
    assert!(wait_gone(ctg.signal_agent(Signal::SIGKILL), Duration::from_secs(5)));
    // `status` finds unfinished work and no agent: it starts one, which re-arms the timer.
    let v = ctg.json(&["status"]);
    assert_eq!(v["pending"][0]["id"].as_str(), Some(id.as_str()), "{v}");
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(30));
    assert_eq!(ns.nft_list(), before);
}

#[test]
fn simulated_reboot_restores_nothing_and_closes_the_transaction() {
    let ns = Ns::new("e2eboot");
    ns.nft(STATEFUL);
    let mut ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s"]);
    ok(&out);
    assert!(wait_gone(ctg.signal_agent(Signal::SIGKILL), Duration::from_secs(5)));
    // Another boot: what the kernel holds now is the booted configuration; ctguard must not touch it.
    let fresh = Ns::new("e2eboot2");
    let boot = ctg.base.join("boot_id");
    std::fs::write(&boot, "00000000-0000-0000-0000-000000000001\n").expect("boot id");
    ctg.env.push(("CTGUARD_BOOT_ID_FILE".into(), boot.display().to_string()));
    ok(&ctg.run(&["recover"]));
    assert_eq!(ctg.outcome(&id), "rolled back: reboot (nothing restored)");
    assert!(ns.nft_list().contains("table inet ctguard"), "recover touched the old namespace");
    assert!(!fresh.nft_list().contains("ctguard"));
}

/// What recovery must leave after the agent dies at `point` (the README's crash table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Prior,
    Committed,
}

/// Kills the agent (abort, like SIGKILL) at `point` during apply, confirm or rollback; then a
/// CLI verb starts a new agent, which recovers. The state is the prior one or the committed
/// one, never a mix.
fn crash_at(point: &str, expect: After) {
    let ns = Ns::new("crash");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let env = [(ctguard::agent::server::FAULT_ENV, point)];
    let out = ctg.run_env(&["--json", "apply", "--netns", ns.name(), "--timeout", "3s"], &env);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut id = v["data"]["txid"].as_str().unwrap_or_default().to_string();
    if point.starts_with("apply:") {
        assert_ne!(out.status.code(), Some(0), "{point}: apply succeeded despite the fault");
    } else {
        ok(&out);
        let verb = if point.starts_with("confirm:") { "confirm" } else { "rollback" };
        let out = ctg.run(&[verb, &id]);
        assert_eq!(out.status.code(), Some(6), "{point}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pins = || std::fs::read_dir(ctg.base.join("run").join("ns")).map(|d| d.count()).unwrap_or(0);
    let left_by_crash = pins();
    if id.is_empty() {
        let h = ctg.json(&["history"]);
        id = h["transactions"][0]["id"].as_str().unwrap_or_default().to_string();
    }
    if id.is_empty() {
        // Killed before anything was journaled (after the pin): nothing to recover, but the
        // next verb starts an agent, which removes the pin that would keep the namespace alive.
        assert_eq!(left_by_crash, 1, "{point}: the pin the crash left");
        // The agent that verb started removes it as it starts (not before the verb returns).
        let t = std::time::Instant::now();
        while pins() != 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pins(), 0, "{point}: a pin outlived its transaction");
        assert_eq!(ns.nft_list(), before, "{point}: not the prior state");
        eprintln!("{point}: nothing journaled, pin removed at the next start");
        return;
    }
    // Any verb starts a new agent (no fault this time), which recovers.
    let _ = ctg.run(&["status"]);
    let start = Instant::now();
    loop {
        let state = ctg.state(&id);
        let done = match expect {
            After::Prior => state == "ROLLED_BACK",
            After::Committed => state == "COMMITTED",
        };
        if done {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(40), "{point}: still {state}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pins(), 0, "{point}: a pin outlived its transaction");
    let now = ns.nft_list();
    match expect {
        After::Prior => assert_eq!(now, before, "{point}: not the prior state"),
        After::Committed => {
            assert!(now.contains("table inet ctguard") && now.contains("untracked accept"), "{point}: {now}")
        }
    }
    eprintln!("{point}: recovered to {expect:?} ({})", ctg.outcome(&id));
}

#[test]
fn crash_apply_after_pin() {
    crash_at("apply:after-pin", After::Prior);
}

#[test]
fn crash_apply_after_prepared() {
    crash_at("apply:after-prepared", After::Prior);
}

#[test]
fn crash_apply_after_apply() {
    crash_at("apply:after-apply", After::Prior);
}

#[test]
fn crash_apply_after_pending() {
    crash_at("apply:after-pending", After::Prior);
}

#[test]
fn crash_confirm_before_journal() {
    crash_at("confirm:before-journal", After::Prior);
}

#[test]
fn crash_confirm_after_journal() {
    crash_at("confirm:after-journal", After::Committed);
}

#[test]
fn crash_rollback_before_engine() {
    crash_at("rollback:before-engine", After::Prior);
}

#[test]
fn crash_rollback_after_engine() {
    crash_at("rollback:after-engine", After::Prior);
}

#[test]
fn every_fault_point_has_a_test() {
    let me = include_str!("txn_cli.rs");
    for p in ctguard::agent::server::FAULT_POINTS {
        assert!(me.contains(&format!("crash_at(\"{p}\"")), "no crash test for {p}");
    }
}

/// Runs `ctguard ARGS` as `nobody` (setpriv from util-linux).
fn as_nobody(ctg: &Ctg, args: &[&str]) -> Output {
    let state = ctg.base.join("state");
    let run = ctg.base.join("run");
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_ctguard"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--run-dir")
        .arg(&run)
        .args(args)
        .output()
        .expect("setpriv")
}

#[test]
fn a_non_root_client_is_refused_by_mode_and_by_peer_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let ns = Ns::new("auth");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s"]);
    ok(&out);
    let sock = ctg.base.join("run").join("ctguard.sock");
    // The run dir and the socket are root-only: nobody cannot even look at them.
    let out = as_nobody(&ctg, &["confirm", &id]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run ctguard as root"), "{out:?}");
    // Opened up for the test, the SO_PEERCRED check refuses it all the same. The CLI refuses a
    // non-root user before it connects, so the request is sent as the library's client does,
    // from a thread that dropped to nobody alone (the raw setresuid changes only the calling
    // thread's credentials, which the socket's peer credentials are taken from).
    std::fs::set_permissions(&ctg.base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(ctg.base.join("run"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(ctg.base.join("state"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_nobody(&ctg, &["confirm", &id]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run ctguard as root"), "{out:?}");
    let run_dir = ctg.base.join("run");
    let txid = id.clone();
    let answer = std::thread::spawn(move || {
        // SAFETY: a raw syscall on this thread's own credentials; no memory is involved.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
        let req = ctguard::agent::protocol::Request::Confirm { txid: Some(txid), netns: None };
        ctguard::agent::client::request(&run_dir, req, Duration::from_secs(5))
    })
    .join()
    .expect("nobody thread");
    let answer = answer.expect("the agent answers a refusal");
    assert_eq!(answer.exit, 2, "{answer:?}");
    assert!(answer.error.as_deref().unwrap_or("").contains("root only"), "{answer:?}");
    assert_eq!(ctg.state(&id), "PENDING");
}

#[test]
fn an_agent_started_under_ip_netns_exec_still_finds_and_recovers_its_target() {
    let ns = Ns::new("netnsexec");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    // As over `ssh host ip netns exec NAME ctguard apply`: no --netns, the caller's namespace.
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), env!("CARGO_BIN_EXE_ctguard"), "--json", "--state-dir"])
        .arg(ctg.base.join("state"))
        .arg("--run-dir")
        .arg(ctg.base.join("run"))
        .args(["apply", "--timeout", "3s"])
        .output()
        .expect("ip netns exec");
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = v["data"]["txid"].as_str().expect("txid").to_string();
    assert_eq!(v["data"]["target"].as_str(), Some(ns.name()), "{v}");
    assert!(ns.nft_list().contains("table inet ctguard"));
    // The agent dies; one started from the initial namespaces recovers the target by name.
    assert!(wait_gone(ctg.signal_agent(Signal::SIGKILL), Duration::from_secs(5)));
    let _ = ctg.run(&["status"]);
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(30));
    assert_eq!(ctg.outcome(&id), "rolled back: deadline");
    assert_eq!(ns.nft_list(), before);
}

/// `ssh -t host ctguard apply` whose connection drops: the session's pty hangs up (SIGHUP to
/// its processes). The agent is in its own session, so the deadline still rolls back.
#[test]
fn a_session_with_a_pty_that_hangs_up_changes_nothing() {
    let ns = Ns::new("pty");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let cmd = format!(
        "{} --state-dir {} --run-dir {} apply --netns {} --timeout 3s; sleep 30",
        env!("CARGO_BIN_EXE_ctguard"),
        ctg.base.join("state").display(),
        ctg.base.join("run").display(),
        ns.name()
    );
    // `script` gives the command a pty and its own session, like sshd does.
    let mut session = Command::new("setsid")
        .args(["script", "-qfc", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("script");
    let start = Instant::now();
    let id = loop {
        let h = ctg.json(&["history"]);
        if let Some(id) = h["transactions"][0]["id"].as_str() {
            break id.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "apply did not happen");
        std::thread::sleep(Duration::from_millis(50));
    };
    ctg.wait_state(&id, "PENDING", Duration::from_secs(30));
    // Hang up the whole session (what a dropped SSH connection does to a pty session).
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(session.id() as i32), Signal::SIGHUP);
    let _ = session.kill();
    let _ = session.wait();
    assert_eq!(ctg.state(&id), "PENDING", "the hang-up changed the transaction");
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(30));
    assert_eq!(ns.nft_list(), before);
}

/// A session without a pty (Ansible) only sees EPIPE when the connection drops: `apply`
/// writing its answer to a closed pipe must not matter either.
#[test]
fn a_session_without_a_pty_that_loses_its_pipe_changes_nothing() {
    let ns = Ns::new("epipe");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .arg("--state-dir")
        .arg(ctg.base.join("state"))
        .arg("--run-dir")
        .arg(ctg.base.join("run"))
        .args(["apply", "--netns", ns.name(), "--timeout", "3s"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // The connection is gone: nobody reads the answer.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let _ = child.wait();
    let h = ctg.json(&["history"]);
    let id = h["transactions"][0]["id"].as_str().expect("applied").to_string();
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(30));
    assert_eq!(ns.nft_list(), before);
}

#[test]
fn extend_through_the_cli_and_an_unusable_state_dir_is_exit_2() {
    let ns = Ns::new("extend");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "2s"]);
    ok(&out);
    let v = ctg.envelope(&["extend", "--by", "1m", &id]);
    assert_eq!(v["exit"], 0, "{v}");
    assert!(v["data"]["seconds_left"].as_u64().is_some_and(|s| s > 55), "{v}");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(ctg.state(&id), "PENDING");
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ns.nft_list(), before);
    // A state dir that cannot hold a journal: refused before anything changes.
    let file = ctg.base.join("not-a-dir");
    std::fs::write(&file, "x").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .arg("--state-dir")
        .arg(&file)
        .arg("--run-dir")
        .arg(ctg.base.join("run2"))
        .args(["apply", "--netns", ns.name(), "--timeout", "60s"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("state dir"));
    assert_eq!(ns.nft_list(), before);
}

/// `apply --ruleset FILE` in both formats: the dead-man timer restores the whole prior
/// firewall, and a change someone else made during the window is reported in `show`.
#[test]
fn ruleset_files_in_both_formats_roll_back_at_the_deadline() {
    let ns = Ns::new("rsfile");
    ns.nft(STATEFUL);
    ns.exec("iptables-legacy", &["-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT"]);
    let listing = |ns: &Ns| {
        format!(
            "{}\n{}",
            ns.nft_list(),
            ns.exec("iptables-legacy-save", &[]).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
        )
    };
    let before = listing(&ns);
    let ctg = Ctg::new();
    let dir = ctg.base.join("files");
    std::fs::create_dir_all(&dir).expect("dir");
    let nft = dir.join("new.nft");
    std::fs::write(&nft, "flush ruleset\ntable inet open {\n  chain input {\n    type filter hook input priority filter; policy accept;\n  }\n}\n").expect("write");
    let ipt = dir.join("new.rules");
    std::fs::write(
        &ipt,
        "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n",
    )
    .expect("write");
    for (file, format) in [(&nft, "nft"), (&ipt, "iptables")] {
        let (out, id) =
            ctg.apply(&ns, &["--timeout", "2s", "--ruleset", file.to_str().expect("utf8"), "--format", format]);
        ok(&out);
        assert_ne!(listing(&ns), before, "{format}: nothing applied");
        if format == "nft" {
            // Someone else's change during the window: overwritten by the rollback, reported.
            ns.nft("add table ip other\n");
        }
        ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(30));
        assert_eq!(listing(&ns), before, "{format}: not the prior firewall");
        if format == "nft" {
            let show = ctg.run(&["show", &id]);
            let text = String::from_utf8_lossy(&show.stdout);
            assert!(text.contains("other"), "drift not reported: {text}");
        }
    }
}

/// DESIGN §8: a ruleset whose application changes no listing is committed at once.
#[test]
fn a_ruleset_that_changes_nothing_is_committed_at_once() {
    let ns = Ns::new("rsnoop");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let dir = ctg.base.join("files");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("extra.nft");
    // A whole-ruleset file (as `/etc/nftables.conf` is): re-applying it changes nothing.
    let content = format!(
        "flush ruleset\n{STATEFUL}table inet extra {{\n  chain input {{\n    type filter hook input priority 10; policy accept;\n    tcp dport 8080 accept\n  }}\n}}\n"
    );
    std::fs::write(&file, content).expect("write");
    let f = file.to_str().expect("utf8");
    let (out, first) = ctg.apply(&ns, &["--timeout", "60s", "--ruleset", f]);
    ok(&out);
    assert_eq!(ctg.state(&first), "PENDING");
    ok(&ctg.run(&["confirm", &first]));
    let after_first = ns.nft_list();
    let out = ctg.run(&["--json", "apply", "--netns", ns.name(), "--timeout", "60s", "--ruleset", f]);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["data"]["noop"], true, "{v}");
    assert_eq!(v["data"]["state"], "COMMITTED", "{v}");
    let second = v["data"]["txid"].as_str().expect("txid").to_string();
    assert_eq!(ctg.state(&second), "COMMITTED");
    assert_eq!(ns.nft_list(), after_first);
}
