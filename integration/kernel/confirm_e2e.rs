//! Confirmation that proves connectivity, end to end (issue 4, DESIGN §4): the real binary, a
//! real detached agent and a real OpenSSH server. `srv` runs sshd (harness `Sshd`), `cli` runs
//! the ssh client; over ssh the remote command is the same binary with the test's own state and
//! run dirs (the namespaces share the filesystem), so the agent it starts is the test's.
//!
//! - lockout: a ruleset dropping all input on `srv`, applied over ssh, 10 times in a row with
//!   and without a pty: rolled back at the deadline, a NEW connection gets in, ruleset as before;
//! - the new-connection proof: a confirm over the applying connection (also through sudo) is
//!   refused with exit 8, one from a second connection commits;
//! - probes run by the agent: a failing one rolls back at once, `--auto-confirm` commits, probes
//!   at the target's own addresses are refused for it, a DNS probe passes through the DNS policy;
//! - `apply --wait` in a real pseudo-terminal (`script`, and `ssh -tt`): Ctrl-C, Enter, a lost
//!   terminal;
//! - SIGUSR1 to the agent: from a local root process it confirms; from the applying SSH session
//!   it is refused;
//! - walking around the proof from the applying connection (issue 14), with `UsePAM yes`
//!   (`pam_loginuid`) and `UsePAM no`: double forks with `env -u SSH_CONNECTION`, `env -i`, a
//!   spoofed `SSH_CONNECTION`, a detached SIGUSR1 sender, `ssh` to 127.0.0.1, to the host's own
//!   address and from another of its addresses: each refused (exit 8, still pending, journaled);
//!   then a new connection from `cli` commits.
//!
//! Facts are printed with `eprintln!` (`cargo test --test kernel confirm_e2e -- --nocapture`).

use std::io::Write;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::dns::DnsServer;
use crate::harness::sshd::{argv_of, descendants, ssh, ssh_spawn, Sshd, SshdOptions};
use crate::harness::{sa, tcp_connect, Ns, Pair, TcpResponder, CLI4, SRV4, STATEFUL};
use crate::txn_cli::{ok, wait_gone, Ctg};

const BIN: &str = env!("CARGO_BIN_EXE_ctguard");
/// The agent's probe timeout (`agent::server::PROBE_TIMEOUT`).
const PROBE_TIMEOUT: Duration = ctguard::agent::server::PROBE_TIMEOUT;
/// Generous bound for anything that should take well under a second.
const WAIT: Duration = Duration::from_secs(10);

/// A ruleset that drops every packet coming in (established ones included): the lockout.
const DROP_ALL_INPUT: &str = "flush ruleset
table inet lockout {
  chain input {
    type filter hook input priority filter; policy drop;
  }
}
";

// ---------------------------------------------------------------------------------------------
// Helpers

/// `BIN --state-dir … --run-dir … ARGS` for a remote shell: the test's own installation.
fn remote(ctg: &Ctg, args: &str) -> String {
    format!(
        "{BIN} --state-dir {} --run-dir {} {args}",
        ctg.base.join("state").display(),
        ctg.base.join("run").display()
    )
}

/// Writes `name` with `text` under the installation's temp dir; returns its path.
fn file(ctg: &Ctg, name: &str, text: &str) -> String {
    let dir = ctg.base.join("files");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("creating {}: {e}", dir.display());
    }
    let path = dir.join(name);
    if let Err(e) = std::fs::write(&path, text) {
        panic!("writing {}: {e}", path.display());
    }
    path.display().to_string()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every transaction id in the journal.
fn txids(ctg: &Ctg) -> Vec<String> {
    let h = ctg.json(&["history"]);
    h["transactions"].as_array().into_iter().flatten().filter_map(|t| t["id"].as_str().map(str::to_string)).collect()
}

/// Waits for a transaction that is not in `seen` to appear in the journal.
fn new_txid(ctg: &Ctg, seen: &[String], limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some(id) = txids(ctg).into_iter().find(|t| !seen.contains(t)) {
            return id;
        }
        assert!(start.elapsed() < limit, "no new transaction after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of `key=` on a line of `out` (what the remote scripts echo).
fn field(out: &str, key: &str) -> Option<String> {
    out.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix(&format!("{key}=")).map(str::to_string))
}

fn agent_log(ctg: &Ctg) -> String {
    std::fs::read_to_string(ctg.base.join("run").join("agent.log")).unwrap_or_default()
}

/// Waits until the agent's log contains `needle`; returns the log.
fn wait_log(ctg: &Ctg, needle: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let log = agent_log(ctg);
        if log.contains(needle) {
            return log;
        }
        assert!(start.elapsed() < limit, "the agent log lacks {needle:?} after {limit:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pending(ctg: &Ctg) -> Vec<Value> {
    ctg.json(&["status"])["pending"].as_array().cloned().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// A terminal: `script` (a local pty) or `ssh -tt` (a remote one), driven through a pipe

/// A process given a pseudo-terminal, its keystrokes written to `stdin`, everything the
/// terminal showed collected from `stdout`. Killed (with what it started, never an agent) on
/// `Drop`.
struct Term {
    child: Child,
    stdin: Option<ChildStdin>,
    out: crate::harness::Captured,
    reader: Option<JoinHandle<()>>,
}

impl Term {
    /// `script -qefc CMD /dev/null` in the test's own namespaces: a local console session
    /// whose exit status is CMD's.
    fn local(cmd: &str) -> Term {
        let mut c = Command::new("script");
        c.args(["-qefc", cmd, "/dev/null"]);
        Term::spawn(c, None)
    }

    /// `ssh -tt … CMD` from `cli` to `sshd`: a remote session with a pty.
    fn ssh(cli: &Ns, sshd: &Sshd, cmd: &str) -> Term {
        let mut c = Command::new("/usr/bin/ssh");
        c.arg("-tt").args(sshd.ssh_args()).arg(cmd);
        Term::spawn(c, Some(cli))
    }

    fn spawn(mut c: Command, ns: Option<&Ns>) -> Term {
        c.env("LC_ALL", "C").env("TERM", "xterm").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        let spawned = match ns {
            Some(ns) => ns.run(move || c.spawn()),
            None => c.spawn(),
        };
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => panic!("cannot start a terminal: {e}"),
        };
        let stdin = child.stdin.take();
        let (out, reader) = match child.stdout.take() {
            Some(pipe) => {
                let (out, reader) = crate::harness::drain(pipe);
                (out, Some(reader))
            }
            None => (crate::harness::Captured::default(), None),
        };
        Term { child, stdin, out, reader }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What the terminal showed so far.
    fn text(&self) -> String {
        crate::harness::captured_text(&self.out)
    }

    /// Types `keys`.
    fn send(&mut self, keys: &[u8]) {
        let Some(w) = self.stdin.as_mut() else { panic!("terminal input closed") };
        if let Err(e) = w.write_all(keys).and_then(|()| w.flush()) {
            panic!("typing {keys:?}: {e}\n{}", self.text());
        }
    }

    /// Waits until the terminal showed `needle`.
    fn wait_for(&mut self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader catch up with the last output.
                std::thread::sleep(Duration::from_millis(100));
                if self.text().contains(needle) {
                    return;
                }
                panic!("the terminal exited ({st}) without showing {needle:?}:\n{}", self.text());
            }
            assert!(start.elapsed() < limit, "the terminal did not show {needle:?} in {limit:?}:\n{}", self.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                if let Some(r) = self.reader.take() {
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while !r.is_finished() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if r.is_finished() {
                        let _ = r.join();
                    }
                }
                return Some(st);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the terminal runs below its own process (the CLI, its shell), never an agent.
    fn below(&self) -> Vec<i32> {
        descendants(self.pid())
            .into_iter()
            .filter(|&p| argv_of(p).get(1).map(String::as_str) != Some("agent"))
            .collect()
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let below = self.below();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in below {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
        }
        if let Some(r) = self.reader.take() {
            let deadline = Instant::now() + Duration::from_millis(500);
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lockout

/// `rounds` times: over ssh (`-tt` with `tty`) apply a ruleset that drops all input on `srv`;
/// the applying session gets nothing back through it; the dead-man timer restores the ruleset
/// and a NEW connection gets in.
fn lockout_rounds(label: &str, tty: bool, rounds: usize) {
    let pair = Pair::new(label);
    pair.srv.nft(STATEFUL);
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    let ctg = Ctg::new();
    let ruleset = file(&ctg, "drop-all.nft", DROP_ALL_INPUT);
    let before = pair.srv.nft_list();
    let cmd = remote(&ctg, &format!("apply --ruleset {ruleset} --format nft --timeout 3s --force"));
    let mut seen = Vec::new();
    let mut client_outcomes = Vec::new();
    for round in 1..=rounds {
        let start = Instant::now();
        let mut client = ssh_spawn(&pair.cli, &sshd, &[], &[&cmd], tty);
        let id = new_txid(&ctg, &seen, WAIT);
        seen.push(id.clone());
        ctg.wait_state(&id, "PENDING", WAIT);
        // Locked out while pending: a new connection to sshd gets no answer (checked while at
        // least a second is left, so the deadline cannot pass during the check).
        let left = pending(&ctg).first().and_then(|p| p["seconds_left"].as_u64()).unwrap_or(0);
        if left >= 1 {
            assert!(!tcp_connect(&pair.cli, sa(SRV4, 22), Duration::from_millis(300)), "round {round}: no lockout");
        } else {
            eprintln!("lockout tty={tty} round {round}: pending seen late ({left} s left): lockout not checked");
        }
        let ended_while_pending = client.try_wait().is_some();
        ctg.wait_state(&id, "ROLLED_BACK", PROBE_TIMEOUT + WAIT);
        let rolled = start.elapsed();
        assert_eq!(ctg.outcome(&id), "rolled back: deadline", "round {round}");
        assert!(
            rolled >= Duration::from_millis(2950),
            "round {round}: rolled back after {rolled:?}, before its 3 s deadline"
        );
        assert_eq!(pair.srv.nft_list(), before, "round {round}: the ruleset differs after the rollback");
        // The applying session: bounded wait, then killed whatever it does.
        let st = client.wait_timeout(Duration::from_millis(500));
        client_outcomes.push(match st {
            Some(s) if ended_while_pending => format!("exit {:?} while pending", s.code()),
            Some(s) => format!("exit {:?} after the rollback", s.code()),
            None => "hung, killed".to_string(),
        });
        drop(client);
        // A NEW connection gets in.
        let out = ssh(&pair.cli, &sshd, &["echo", &format!("back-{round}")], tty);
        assert!(
            out.success() && out.stdout.contains(&format!("back-{round}")),
            "round {round}: new connection after the rollback: {out:?}\nsshd log:\n{}",
            sshd.log()
        );
        assert!(pending(&ctg).is_empty(), "round {round}");
        eprintln!("lockout tty={tty} round {round}: {id} rolled back after {rolled:?}, new connection ok");
    }
    eprintln!("lockout tty={tty}: the applying ssh client per round: {client_outcomes:?}");
}

#[test]
fn lockout_over_ssh_rolls_back_10_times_with_and_without_pty() {
    std::thread::scope(|s| {
        let a = s.spawn(|| lockout_rounds("ce-lock-notty", false, 10));
        let b = s.spawn(|| lockout_rounds("ce-lock-tty", true, 10));
        for h in [a, b] {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The new-connection proof

#[test]
fn same_connection_confirm_is_refused_and_a_new_connection_commits() {
    let pair = Pair::new("ce-same");
    pair.srv.nft(STATEFUL);
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    let ctg = Ctg::new();
    let before = pair.srv.nft_list();
    let script = format!(
        "{apply} >/dev/null 2>&1; echo apply=$?; {confirm}; echo confirm=$?; \
         echo sudo-env=$(sudo -n printenv SSH_CONNECTION); sudo -n {confirm}; echo sudo=$?",
        apply = remote(&ctg, "apply --timeout 5s"),
        confirm = remote(&ctg, "confirm"),
    );
    let start = Instant::now();
    let out = ssh(&pair.cli, &sshd, &[&script], false);
    let first = start.elapsed();
    eprintln!("same connection ({first:?}):\n{}{}", out.stdout, out.stderr);
    assert_eq!(field(&out.stdout, "apply").as_deref(), Some("0"), "{out:?}");
    let id = new_txid(&ctg, &[], WAIT);
    assert_eq!(field(&out.stdout, "confirm").as_deref(), Some("8"), "{out:?}");
    assert_eq!(field(&out.stdout, "sudo").as_deref(), Some("8"), "{out:?}");
    // sudo strips SSH_CONNECTION: the proof comes from the process ancestry.
    assert_eq!(field(&out.stdout, "sudo-env").as_deref(), Some(""), "{out:?}");
    // The printed command reaches this test's agent: it carries the non-default dirs.
    let cmd = format!(
        "ssh -o ControlPath=none 198.18.0.1 ctguard --state-dir {} --run-dir {} confirm {id}",
        ctg.base.join("state").display(),
        ctg.base.join("run").display()
    );
    let refusals = out.stderr.matches(&cmd).count();
    assert_eq!(refusals, 2, "both refusals must name the new-connection command {cmd:?}: {out:?}");
    assert!(out.stderr.contains("NEW connection"), "{out:?}");
    assert_eq!(ctg.state(&id), "PENDING");
    assert!(first < Duration::from_secs(4), "the first session took {first:?} of the 5 s window");
    // A second, separate connection confirms.
    let out = ssh(&pair.cli, &sshd, &[&remote(&ctg, &format!("confirm {id}"))], false);
    assert!(out.success() && out.stdout.contains("committed"), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "confirmed only after {:?}", start.elapsed());
    assert_eq!(ctg.state(&id), "COMMITTED");
    // The change stays after the deadline.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(start.elapsed()) + Duration::from_millis(500));
    assert_eq!(ctg.state(&id), "COMMITTED");
    let after = pair.srv.nft_list();
    assert!(after.contains("table inet ctguard") && after != before, "{after}");
    let show = ctg.json(&["show", &id]);
    eprintln!("same connection: {id} {}; requester {}", show["outcome"], show["requester"]);
}

// ---------------------------------------------------------------------------------------------
// Probes

#[test]
fn probe_failure_rolls_back_at_once_long_before_the_deadline() {
    let pair = Pair::new("ce-probe-out");
    pair.srv.nft(STATEFUL);
    let listener = TcpResponder::start(&pair.cli, sa(CLI4, 8080));
    assert!(tcp_connect(&pair.srv, sa(CLI4, 8080), Duration::from_secs(1)), "no path to the listener before");
    let ctg = Ctg::new();
    let ruleset = file(
        &ctg,
        "no-egress.nft",
        &format!(
            "flush ruleset\n{STATEFUL}table inet egress {{\n  chain output {{\n    type filter hook output priority filter; policy drop;\n    oif \"lo\" accept\n  }}\n}}\n"
        ),
    );
    let before = pair.srv.nft_list();
    // The pre-check's connection, counted for sure (issue 10: reading the count right after the
    // connect raced the listener thread), and nothing else.
    let accepted = listener.accepted_settled(1, Duration::from_secs(2), Duration::from_millis(300));
    assert_eq!(accepted, 1, "the pre-check's connection");
    let start = Instant::now();
    let (out, _) = ctg.apply(
        &pair.srv,
        &["--ruleset", &ruleset, "--format", "nft", "--timeout", "60s", "--probe", "tcp:198.18.0.2:8080"],
    );
    let took = start.elapsed();
    eprintln!("probe tcp under an output drop: {took:?}\n{}", text(&out));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(took < PROBE_TIMEOUT + Duration::from_secs(3), "apply took {took:?}");
    let id = txids(&ctg).into_iter().next().expect("journaled");
    assert_eq!(ctg.state(&id), "ROLLED_BACK");
    let outcome = ctg.outcome(&id);
    assert!(outcome.starts_with("rolled back: probe failed: tcp:198.18.0.2:8080"), "{outcome}");
    assert_eq!(pair.srv.nft_list(), before);
    // Exact: a connection that slipped through would be counted within the quiet window.
    assert_eq!(
        listener.accepted_settled(accepted, Duration::ZERO, Duration::from_millis(500)),
        accepted,
        "the probe got through the output drop"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(v["data"]["probes"][0]["ok"], false, "{v}");
    assert!(pending(&ctg).is_empty());
}

/// `--probe-interval`: the probes repeat while pending; when the path breaks the next round
/// rolls back at once, long before the deadline.
#[test]
fn probe_rounds_repeat_and_a_later_failure_rolls_back_at_once() {
    let pair = Pair::new("ce-probe-every");
    pair.srv.nft(STATEFUL);
    let listener = TcpResponder::start(&pair.cli, sa(CLI4, 8083));
    let ctg = Ctg::new();
    let before = pair.srv.nft_list();
    let (out, id) =
        ctg.apply(&pair.srv, &["--timeout", "60s", "--probe", "tcp:198.18.0.2:8083", "--probe-interval", "1s"]);
    ok(&out);
    assert!(listener.wait_accepted(3, Duration::from_secs(4)) >= 3, "the probe rounds do not repeat");
    assert_eq!(ctg.state(&id), "PENDING");
    // The path breaks: cli drops everything coming in.
    pair.cli
        .nft("table inet cut {\n  chain input {\n    type filter hook input priority filter; policy drop;\n  }\n}\n");
    let cut = Instant::now();
    let limit = Duration::from_secs(1) + PROBE_TIMEOUT + Duration::from_secs(3);
    ctg.wait_state(&id, "ROLLED_BACK", limit);
    let took = cut.elapsed();
    let outcome = ctg.outcome(&id);
    eprintln!("probe rounds: rolled back {took:?} after the path broke: {outcome}");
    assert!(outcome.starts_with("rolled back: probe failed: tcp:198.18.0.2:8083"), "{outcome}");
    assert_eq!(pair.srv.nft_list(), before);
}

#[test]
fn auto_confirm_commits_when_the_probe_towards_cli_passes() {
    let pair = Pair::new("ce-probe-auto");
    pair.srv.nft(STATEFUL);
    let listener = TcpResponder::start(&pair.cli, sa(CLI4, 8081));
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&pair.srv, &["--timeout", "60s", "--probe", "tcp:198.18.0.2:8081", "--auto-confirm"]);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(v["data"]["state"], "COMMITTED", "{v}");
    assert_eq!(v["data"]["probes"][0]["ok"], true, "{v}");
    assert_eq!(ctg.state(&id), "COMMITTED");
    assert!(listener.wait_accepted(1, Duration::from_secs(2)) >= 1);
    assert!(pending(&ctg).is_empty());
    assert!(pair.srv.nft_list().contains("table inet ctguard"));
    eprintln!("auto-confirm: {id} {}", ctg.outcome(&id));
}

#[test]
fn auto_confirm_refuses_probes_at_the_targets_own_addresses() {
    let pair = Pair::new("ce-probe-self");
    pair.srv.nft(STATEFUL);
    let _listener = TcpResponder::start(&pair.cli, sa(CLI4, 8082));
    let ctg = Ctg::new();
    let before = pair.srv.nft_list();
    for probes in [
        vec!["tcp:198.18.0.1:22"],
        vec!["tcp:198.18.0.2:8082", "tcp:198.18.0.1:22"],
        vec!["tcp:127.0.0.1:22"],
        vec!["icmp:[fd42::1]"],
    ] {
        let mut args = vec!["--timeout", "60s", "--auto-confirm"];
        for p in &probes {
            args.extend(["--probe", p]);
        }
        let (out, _) = ctg.apply(&pair.srv, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{probes:?}: {}", text(&out));
        assert!(err.contains("own addresses"), "{probes:?}: {err}");
        assert_eq!(pair.srv.nft_list(), before, "{probes:?}");
        assert!(txids(&ctg).is_empty(), "{probes:?}: journaled");
        eprintln!("auto-confirm {probes:?}: {}", err.trim());
    }
    assert!(pending(&ctg).is_empty());
}

#[test]
fn udp_dns_probe_passes_through_the_dns_policy() {
    let pair = Pair::new("ce-probe-dns");
    pair.srv.nft(STATEFUL);
    let dns = DnsServer::start(&pair.cli, sa(CLI4, 53));
    let ctg = Ctg::new();
    let before = pair.srv.nft_list();
    let (out, id) = ctg.apply(&pair.srv, &["--timeout", "60s", "--probe", "udp-dns:198.18.0.2:53:example.org"]);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    eprintln!("udp-dns probe: {}", v["data"]["probes"]);
    assert_eq!(v["data"]["probes"][0]["ok"], true, "{v}");
    assert_eq!(v["data"]["state"], "PENDING", "{v}");
    assert!(dns.answered() >= 1);
    let during = pair.srv.nft_list();
    assert!(during.contains("table inet ctguard") && during.contains("table inet host"), "{during}");
    assert_eq!(ctg.state(&id), "PENDING");
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(pair.srv.nft_list(), before);
}

// ---------------------------------------------------------------------------------------------
// apply --wait in a pseudo-terminal

fn wait_cmd(ctg: &Ctg, ns: &Ns, timeout: &str) -> String {
    format!("exec {}", remote(ctg, &format!("apply --netns {} --timeout {timeout} --wait", ns.name())))
}

#[test]
fn wait_ctrl_c_rolls_back_now() {
    let ns = Ns::new("ce-wait-int");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let mut term = Term::local(&wait_cmd(&ctg, &ns, "30s"));
    term.wait_for("press Enter to confirm, Ctrl-C to roll back now.", WAIT);
    term.wait_for("s left before the automatic rollback", WAIT);
    let id = new_txid(&ctg, &[], WAIT);
    assert_eq!(ctg.state(&id), "PENDING");
    assert!(ns.nft_list().contains("table inet ctguard"));
    let start = Instant::now();
    term.send(b"\x03");
    let st = term.wait_exit(WAIT);
    let shown = term.text();
    eprintln!("--wait + Ctrl-C after {:?}: {st:?}\n{shown:?}", start.elapsed());
    assert_eq!(st.and_then(|s| s.code()), Some(5), "{shown}");
    assert!(shown.contains(&format!("{id} rolled back (Ctrl-C)")), "{shown}");
    // On a tty the countdown is updated in place.
    assert!(shown.contains("\r   ") || shown.contains("\r  "), "no in-place countdown: {shown:?}");
    assert_eq!(ctg.outcome(&id), "rolled back: cancelled");
    assert_eq!(ns.nft_list(), before);
}

#[test]
fn wait_enter_commits_on_a_local_console() {
    let ns = Ns::new("ce-wait-enter");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let mut term = Term::local(&wait_cmd(&ctg, &ns, "30s"));
    term.wait_for("s left before the automatic rollback", WAIT);
    let id = new_txid(&ctg, &[], WAIT);
    term.send(b"\r");
    let st = term.wait_exit(WAIT);
    let shown = term.text();
    eprintln!("--wait + Enter: {st:?}\n{shown:?}");
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{shown}");
    assert!(shown.contains(&format!("{id} committed")), "{shown}");
    assert_eq!(ctg.state(&id), "COMMITTED");
    assert!(ns.nft_list().contains("table inet ctguard"));
}

/// Over `ssh -tt`: with `--allow-same-connection` Enter commits; with the proof on Enter does
/// nothing, the terminal shows the command for a new connection, and a confirm from one ends
/// the wait.
#[test]
fn wait_over_ssh_enter_only_without_the_proof() {
    let pair = Pair::new("ce-wait-ssh");
    pair.srv.nft(STATEFUL);
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    let ctg = Ctg::new();
    let mut seen = Vec::new();

    // --allow-same-connection: Enter confirms.
    let mut term = Term::ssh(&pair.cli, &sshd, &remote(&ctg, "apply --timeout 30s --wait --allow-same-connection"));
    term.wait_for("press Enter to confirm", WAIT);
    term.wait_for("s left before the automatic rollback", WAIT);
    let a = new_txid(&ctg, &seen, WAIT);
    seen.push(a.clone());
    term.send(b"\r");
    let st = term.wait_exit(WAIT);
    eprintln!("ssh -tt --wait --allow-same-connection + Enter: {st:?}\n{:?}", term.text());
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", term.text());
    assert_eq!(ctg.state(&a), "COMMITTED");
    drop(term);

    // The proof on: Enter is no confirmation; a new connection's is.
    let mut term = Term::ssh(&pair.cli, &sshd, &remote(&ctg, "apply --timeout 30s --wait"));
    term.wait_for("waiting for the confirmation from a NEW connection", WAIT);
    let b = new_txid(&ctg, &seen, WAIT);
    term.wait_for(&format!("--run-dir {} confirm {b}", ctg.base.join("run").display()), WAIT);
    term.send(b"\r");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(ctg.state(&b), "PENDING", "Enter confirmed over the applying connection:\n{}", term.text());
    assert!(term.child.try_wait().ok().flatten().is_none(), "the wait ended:\n{}", term.text());
    let out = ssh(&pair.cli, &sshd, &[&remote(&ctg, &format!("confirm {b}"))], false);
    assert!(out.success(), "{out:?}");
    let st = term.wait_exit(WAIT);
    eprintln!("ssh -tt --wait, proof on, confirmed from a new connection: {st:?}\n{:?}", term.text());
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", term.text());
    assert!(term.text().contains(&format!("{b} committed")), "{}", term.text());
    assert_eq!(ctg.state(&b), "COMMITTED");
    seen.push(b);
    drop(term);

    // The proof on: Ctrl-C still rolls back now.
    let before = pair.srv.nft_list();
    let mut term = Term::ssh(&pair.cli, &sshd, &remote(&ctg, "apply --timeout 30s --wait"));
    term.wait_for("Ctrl-C rolls back now.", WAIT);
    term.wait_for("s left before the automatic rollback", WAIT);
    let c = new_txid(&ctg, &seen, WAIT);
    term.send(b"\x03");
    let st = term.wait_exit(WAIT);
    eprintln!("ssh -tt --wait, proof on, Ctrl-C: {st:?}\n{:?}", term.text());
    assert_eq!(st.and_then(|s| s.code()), Some(5), "{}", term.text());
    assert!(term.text().contains(&format!("{c} rolled back (Ctrl-C)")), "{}", term.text());
    assert_eq!(ctg.outcome(&c), "rolled back: cancelled");
    assert_eq!(pair.srv.nft_list(), before, "not the committed policy again");
}

#[test]
fn wait_lost_terminal_leaves_the_deadline_in_force() {
    let ns = Ns::new("ce-wait-hup");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let start = Instant::now();
    let mut term = Term::local(&wait_cmd(&ctg, &ns, "4s"));
    term.wait_for("s left before the automatic rollback", WAIT);
    let id = new_txid(&ctg, &[], WAIT);
    let cli: Vec<i32> = term.below();
    // Close the terminal: its master side goes away (SIGHUP to the session).
    let _ = term.child.kill();
    let _ = term.child.wait();
    let closed = start.elapsed();
    assert_eq!(ctg.state(&id), "PENDING", "closing the terminal changed the transaction");
    let cli_gone = cli.iter().all(|&p| wait_gone(p, Duration::from_secs(2)));
    eprintln!("--wait, terminal closed after {closed:?}: the CLI {cli:?} exited: {cli_gone}");
    // Still pending until the deadline, rolled back by it.
    let flipped = loop {
        let s = ctg.state(&id);
        if s != "PENDING" {
            break start.elapsed();
        }
        assert!(start.elapsed() < PROBE_TIMEOUT + WAIT, "still pending after {:?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ctg.outcome(&id), "rolled back: deadline");
    assert!(flipped >= Duration::from_millis(3950), "rolled back after {flipped:?}, before the 4 s deadline");
    assert_eq!(ns.nft_list(), before);
    eprintln!("--wait, terminal closed: rolled back by the deadline at {flipped:?}");
}

// ---------------------------------------------------------------------------------------------
// SIGUSR1

#[test]
fn sigusr1_from_a_local_root_process_confirms() {
    let ns = Ns::new("ce-usr1-local");
    let other = Ns::new("ce-usr1-other");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "30s"]);
    ok(&out);
    // Two pending (two targets, one agent): refused, with a log line.
    let (out, id2) = ctg.apply(&other, &["--timeout", "30s"]);
    ok(&out);
    ctg.signal_agent(Signal::SIGUSR1);
    let me = std::process::id();
    let log = wait_log(&ctg, &format!("SIGUSR1 from pid Some({me}) refused"), Duration::from_secs(3));
    assert!(log.contains("2 transactions are pending"), "{log}");
    assert_eq!((ctg.state(&id).as_str(), ctg.state(&id2).as_str()), ("PENDING", "PENDING"));
    ok(&ctg.run(&["rollback", &id2]));
    // One pending: the signal confirms it.
    let pid = ctg.signal_agent(Signal::SIGUSR1);
    ctg.wait_state(&id, "COMMITTED", Duration::from_secs(3));
    // The sender went through the proof: a local process.
    let show = ctg.run(&["show", &id]);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains("confirmed from local"), "{shown}");
    assert!(ns.nft_list().contains("table inet ctguard"));
    assert_eq!(agent_log(&ctg).matches("SIGUSR1 from").count(), 1, "{}", agent_log(&ctg));
    eprintln!("SIGUSR1 to agent {pid} from the test process {me}: {}", ctg.outcome(&id));
}

#[test]
fn sigusr1_from_the_applying_ssh_session_is_refused() {
    let pair = Pair::new("ce-usr1-ssh");
    pair.srv.nft(STATEFUL);
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    let ctg = Ctg::new();
    // The shell that applied sends the signal (its builtin kill) and stays alive a moment so
    // the agent can check it: the refusal is the proof's, not "sender gone".
    let script = format!(
        "{apply} >/dev/null 2>&1; echo apply=$?; \
         pid=$({status} | sed -n 's/.*\"agent_pid\": *\\([0-9][0-9]*\\).*/\\1/p'); echo agent=$pid; \
         echo shell=$$; kill -USR1 $pid; echo kill=$?; sleep 1",
        apply = remote(&ctg, "apply --timeout 10s"),
        status = remote(&ctg, "--json status"),
    );
    let out = ssh(&pair.cli, &sshd, &[&script], false);
    eprintln!("SIGUSR1 over ssh:\n{}{}", out.stdout, out.stderr);
    assert_eq!(field(&out.stdout, "apply").as_deref(), Some("0"), "{out:?}");
    assert_eq!(field(&out.stdout, "kill").as_deref(), Some("0"), "{out:?}");
    let shell = field(&out.stdout, "shell").unwrap_or_default();
    let agent = field(&out.stdout, "agent").unwrap_or_default();
    assert_eq!(agent.parse::<i32>().ok(), ctg.agent_pid(), "{out:?}");
    let id = new_txid(&ctg, &[], WAIT);
    let log = wait_log(&ctg, &format!("SIGUSR1 from pid Some({shell}) refused"), Duration::from_secs(3));
    let line = log.lines().find(|l| l.contains("SIGUSR1 from pid")).unwrap_or_default().to_string();
    eprintln!("agent: {line}");
    assert!(line.contains("same SSH connection") && line.contains("NEW connection"), "{line}");
    assert_eq!(ctg.state(&id), "PENDING");
    // The same signal from a new connection's shell confirms.
    let script = format!("kill -USR1 {agent}; echo kill=$?; sleep 1");
    let out = ssh(&pair.cli, &sshd, &[&script], false);
    assert_eq!(field(&out.stdout, "kill").as_deref(), Some("0"), "{out:?}");
    ctg.wait_state(&id, "COMMITTED", Duration::from_secs(3));
    let applied = ctg.json(&["show", &id])["requester"]["ssh"].as_str().unwrap_or_default().to_string();
    let applied_port = applied.split(' ').nth(1).unwrap_or("?").to_string();
    let show = ctg.run(&["show", &id]);
    let shown = String::from_utf8_lossy(&show.stdout);
    let note = shown.lines().find(|l| l.contains("confirmed from")).unwrap_or_default().trim().to_string();
    assert!(note.contains("confirmed from ssh 198.18.0.2:"), "{shown}");
    // The confirming connection (the note goes on naming the applying one it differs from).
    let confirming = note.split("confirmed from ssh ").nth(1).and_then(|r| r.split(" ->").next()).unwrap_or_default();
    assert_ne!(confirming, format!("198.18.0.2:{applied_port}"), "applied over {applied}: {note}");
    assert!(note.contains(&format!("vs 198.18.0.2:{applied_port} -> 198.18.0.1:22")), "{note}");
    eprintln!("SIGUSR1 from a new connection (applied over {applied}): {note}");
}

// ---------------------------------------------------------------------------------------------
// Walking around the proof from the applying connection (issue 14)

/// What the disguises of [`disguises_from_the_applying_connection`] left behind (files under `d`).
struct Disguise {
    name: &'static str,
    /// Exit status of the confirm (or of `kill` for `usr1`).
    rc: String,
    /// What the confirm printed.
    out: String,
}

fn read_trim(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default().trim().to_string()
}

/// Over ONE ssh connection from `cli`: apply (pending 60 s), then every known way of confirming
/// from that same connection while looking like another one; returns the applying shell's audit
/// session id and each disguise's outcome. The remote command is what an operator would type.
fn disguises_from_the_applying_connection(pair: &Pair, sshd: &Sshd, ctg: &Ctg) -> (String, Vec<Disguise>) {
    let d = ctg.base.join("disguises");
    if let Err(e) = std::fs::create_dir_all(&d) {
        panic!("creating {}: {e}", d.display());
    }
    let dd = d.display();
    let key = sshd.client_key();
    let confirm = remote(ctg, "confirm");
    let ssh_cmd = format!(
        "/usr/bin/ssh -T -F /dev/null -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o GlobalKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR \
         -o ControlPath=none -o ConnectTimeout=5 -p 22",
        key.display()
    );
    // Each detached disguise is a double fork: the subshell exits at once, its child is
    // reparented away from the sshd tree.
    let script = format!(
        r#"D={dd}
CONFIRM="{confirm}"
{apply} >$D/apply.out 2>&1; echo $? >$D/apply.rc
cat /proc/self/sessionid >$D/session
AGENT=$({status} | sed -n 's/.*"agent_pid": *\([0-9][0-9]*\).*/\1/p')
wait_rc() {{ for i in $(seq 150); do [ -s "$1" ] && return 0; sleep 0.1; done; echo timeout >"$1"; }}
( env -u SSH_CONNECTION /bin/sh -c "$CONFIRM >$D/env-u.out 2>&1; echo \$? >$D/env-u.rc" </dev/null >/dev/null 2>&1 & )
wait_rc $D/env-u.rc
( env -i /bin/sh -c "$CONFIRM >$D/env-i.out 2>&1; echo \$? >$D/env-i.rc" </dev/null >/dev/null 2>&1 & )
wait_rc $D/env-i.rc
( env SSH_CONNECTION='203.0.113.9 4242 198.18.0.1 22' /bin/sh -c "$CONFIRM >$D/spoof.out 2>&1; echo \$? >$D/spoof.rc" </dev/null >/dev/null 2>&1 & )
wait_rc $D/spoof.rc
( env -i /bin/sh -c "echo \$\$ >$D/usr1.pid; kill -USR1 $AGENT; echo \$? >$D/usr1.rc; sleep 3" </dev/null >/dev/null 2>&1 & )
wait_rc $D/usr1.rc
{ssh_cmd} root@127.0.0.1 "$CONFIRM" >$D/ssh-lo.out 2>&1; echo $? >$D/ssh-lo.rc
{ssh_cmd} root@198.18.0.1 "$CONFIRM" >$D/ssh-self.out 2>&1; echo $? >$D/ssh-self.rc
{ssh_cmd} -b 198.18.0.77 root@198.18.0.1 "$CONFIRM" >$D/ssh-other.out 2>&1; echo $? >$D/ssh-other.rc
echo done
"#,
        apply = remote(ctg, "apply --timeout 60s"),
        status = remote(ctg, "--json status"),
    );
    let path = file(ctg, "disguises.sh", &script);
    let out = ssh(&pair.cli, sshd, &["bash", &path], false);
    assert!(out.success() && out.stdout.contains("done"), "{out:?}\nsshd log:\n{}", sshd.log());
    assert_eq!(read_trim(&d.join("apply.rc")), "0", "apply: {}", read_trim(&d.join("apply.out")));
    let names = ["env-u", "env-i", "spoof", "usr1", "ssh-lo", "ssh-self", "ssh-other"];
    let res = names
        .iter()
        .map(|n| Disguise {
            name: n,
            rc: read_trim(&d.join(format!("{n}.rc"))),
            out: read_trim(&d.join(format!("{n}.out"))),
        })
        .collect();
    (read_trim(&d.join("session")), res)
}

/// The disguises refused (exit 8, the reason named, still pending, journaled), then a confirm
/// from a genuinely new connection from `cli` commits. `detached_reason` is what the detached
/// disguises must be refused for.
fn disguises_refused_then_a_new_connection_commits(label: &str, use_pam: bool) {
    let pair = Pair::new(label);
    pair.srv.nft(STATEFUL);
    // Another address of srv's own, to reach sshd from (`ssh -b`): caught only by the agent's
    // list of the target's addresses, not by "client = server".
    pair.srv.exec("ip", &["addr", "add", "198.18.0.77/32", "dev", "lo"]);
    let opts = SshdOptions { use_pam, also_listen: vec![std::net::Ipv4Addr::LOCALHOST.into()] };
    let sshd = Sshd::start_with(&pair.srv, SRV4.into(), 22, &opts);
    let ctg = Ctg::new();
    let (session, res) = disguises_from_the_applying_connection(&pair, &sshd, &ctg);
    let id = new_txid(&ctg, &[], WAIT);
    let sid: Option<u32> = session.parse().ok().filter(|&s| s != u32::MAX);
    eprintln!("disguises (UsePAM {use_pam}): the applying shell's audit session {session:?}");
    if use_pam {
        assert!(sid.is_some(), "pam_loginuid gave the connection no audit session id ({session:?})");
    }
    let detached_reason = match sid {
        Some(s) => format!("same login session as the apply (audit session {s})"),
        None => "no identifier".to_string(),
    };
    for r in &res {
        eprintln!("disguise {} (UsePAM {use_pam}): exit {}: {}", r.name, r.rc, r.out.replace('\n', " | "));
        if r.name == "usr1" {
            continue;
        }
        assert_eq!(r.rc, "8", "{}: {}", r.name, r.out);
        assert!(r.out.contains("confirm refused") && r.out.contains("NEW connection"), "{}: {}", r.name, r.out);
        let want = match r.name {
            "ssh-lo" | "ssh-self" | "ssh-other" => {
                "over loopback / from this host: proves nothing about the outside path"
            }
            _ => detached_reason.as_str(),
        };
        let also =
            if r.name.starts_with("ssh") || sid.is_some() { want } else { "does not run under an SSH connection" };
        assert!(r.out.contains(want) || r.out.contains(also), "{}: expected {want:?}: {}", r.name, r.out);
        assert_eq!(ctg.state(&id), "PENDING", "after {}", r.name);
    }
    let client_of = |name: &str| res.iter().find(|r| r.name == name).map(|r| r.out.clone()).unwrap_or_default();
    assert!(client_of("ssh-lo").contains("127.0.0.1 is over loopback"), "{}", client_of("ssh-lo"));
    assert!(client_of("ssh-other").contains("198.18.0.77 is over loopback"), "{}", client_of("ssh-other"));
    // SIGUSR1 from a detached sender of the applying session: refused by the proof.
    let usr1 = res.iter().find(|r| r.name == "usr1").map(|r| r.rc.clone()).unwrap_or_default();
    assert_eq!(usr1, "0", "kill -USR1 failed");
    let sender = read_trim(&ctg.base.join("disguises").join("usr1.pid"));
    let log = wait_log(&ctg, &format!("SIGUSR1 from pid Some({sender}) refused"), Duration::from_secs(3));
    let line = log.lines().find(|l| l.contains(&format!("SIGUSR1 from pid Some({sender})"))).unwrap_or_default();
    eprintln!("disguise usr1 (UsePAM {use_pam}): agent: {line}");
    // Refused either way; which identifier matched first depends on whether the double fork
    // had left the sshd process tree yet when the signal was sent (a loaded machine) — or
    // was leaving it while the agent read the sender's ancestry (then no connection can be
    // named: refused as unidentified; seen once in a clean-clone CI run).
    assert!(
        line.contains(&detached_reason)
            || line.contains("same SSH connection")
            || (sid.is_none() && line.contains("does not run under an SSH"))
            || line.contains("cannot identify its SSH connection"),
        "{line}"
    );
    assert_eq!(ctg.state(&id), "PENDING");
    // Every refusal is journaled with what it rested on; the spoofed claim is marked unverified.
    let notes: Vec<String> = ctg.json(&["show", &id])["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["note"].as_str().map(str::to_string))
        .filter(|n| n.starts_with("confirm refused from"))
        .collect();
    assert_eq!(notes.len(), 7, "{notes:#?}");
    assert!(notes.iter().any(|n| n.contains("UNVERIFIED SSH_CONNECTION claim: 203.0.113.9:4242")), "{notes:#?}");
    assert!(!notes.iter().any(|n| n.contains("confirm refused from ssh 203.0.113.9")), "{notes:#?}");
    // A genuinely new connection from cli confirms.
    let out = ssh(&pair.cli, &sshd, &[&remote(&ctg, &format!("confirm {id}"))], false);
    assert!(out.success() && out.stdout.contains("committed"), "{out:?}");
    assert_eq!(ctg.state(&id), "COMMITTED");
    let show = ctg.run(&["show", &id]);
    let shown = String::from_utf8_lossy(&show.stdout);
    let note = shown.lines().find(|l| l.contains("confirmed from")).unwrap_or_default().trim().to_string();
    eprintln!("disguises (UsePAM {use_pam}): then {note}");
    assert!(note.contains("confirmed from ssh 198.18.0.2:") && note.contains("a new SSH connection from 198.18.0.2"));
    if let Some(s) = sid {
        assert!(note.contains("audit session") && note.contains(&format!(" vs {s}")), "{note}");
    }
    assert!(!shown.contains("confirmed from local"), "{shown}");
}

#[test]
fn disguises_from_the_applying_connection_are_refused_with_pam_loginuid() {
    disguises_refused_then_a_new_connection_commits("ce-disg-pam", true);
}

#[test]
fn disguises_from_the_applying_connection_are_refused_without_pam() {
    disguises_refused_then_a_new_connection_commits("ce-disg-nopam", false);
}
