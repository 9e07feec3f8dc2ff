//! Issue 11: the agent as the single owner of every transaction, shown by racing it — parallel
//! applies on one target, confirm and extend sent at the deadline ±50 ms, a full disk between
//! the snapshot and the journal write, a damaged PENDING record, a flood of idle clients under
//! a 1,024 descriptor limit. In every trial the exit code, the journal and the kernel agree.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::txn_cli::{ok, Ctg};
use crate::harness::{Ns, STATEFUL};
use crate::policy_txn::LEGACY_FW;

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Starts this installation's agent (a `status` with a pending-free journal does not).
fn start_agent(ctg: &Ctg) {
    let out = ctg.run(&["rollback"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(ctg.agent_pid().is_some(), "no agent");
}

/// Runs `n` copies of `args` at once (released together by a barrier); their outputs.
fn parallel(ctg: &Ctg, n: usize, args: &[&str]) -> Vec<Output> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    ctg.run(args)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    })
}

/// Exactly one apply won (exit 0, its txid), every other got exit 4 naming it; one record.
fn one_winner(ctg: &Ctg, outs: &[Output]) -> String {
    let winners: Vec<&Output> = outs.iter().filter(|o| code(o) == 0).collect();
    let codes: Vec<i32> = outs.iter().map(code).collect();
    assert_eq!(winners.len(), 1, "exit codes {codes:?}");
    let v: Value = serde_json::from_slice(&winners[0].stdout).expect("json");
    let id = v["data"]["txid"].as_str().expect("txid").to_string();
    for o in outs.iter().filter(|o| code(o) != 0) {
        assert_eq!(code(o), 4, "{}", text(o));
        assert!(text(o).contains(&id), "the loser does not name the winner {id}: {}", text(o));
    }
    let h = ctg.json(&["history"]);
    assert_eq!(h["transactions"].as_array().map(Vec::len), Some(1), "only the winner is journaled: {h}");
    id
}

#[test]
fn twenty_parallel_ruleset_applies_one_winner_and_the_prior_state_back() {
    let ns = Ns::new("race-rs");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    start_agent(&ctg);
    let file = ctg.base.join("drop-all.nft");
    std::fs::write(
        &file,
        "flush ruleset\ntable inet lock {\n  chain input {\n    type filter hook input priority filter; policy drop;\n  }\n}\n",
    )
    .expect("write");
    let args = ["--json", "apply", "--netns", ns.name(), "--timeout", "3s", "--ruleset", file.to_str().expect("utf8")];
    let outs = parallel(&ctg, 20, &args);
    let id = one_winner(&ctg, &outs);
    assert!(ns.nft_list().contains("table inet lock"));
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(20));
    assert_eq!(ns.nft_list(), before, "not the prior ruleset after the rollback");
}

#[test]
fn twenty_parallel_policy_applies_one_winner_and_the_prior_state_back() {
    let ns = Ns::new("race-pol");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    start_agent(&ctg);
    let outs = parallel(&ctg, 20, &["--json", "apply", "--netns", ns.name(), "--timeout", "3s"]);
    let id = one_winner(&ctg, &outs);
    let during = ns.nft_list();
    assert!(during.contains("table inet ctguard") && during.contains("untracked accept"), "{during}");
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(20));
    assert_eq!(ns.nft_list(), before, "not the prior ruleset after the rollback");
}

/// Over a committed policy: two re-applies at once never leave a mix of old and new.
#[test]
fn parallel_reapplies_over_a_committed_policy_never_mix() {
    let ns = Ns::new("race-re");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let (out, first) = ctg.apply(&ns, &["--timeout", "60s"]);
    ok(&out);
    ok(&ctg.run(&["confirm", &first]));
    let committed = ns.nft_list();
    let dir = ctg.base.join("p");
    std::fs::create_dir_all(&dir).expect("dir");
    let policy = dir.join("b.toml");
    std::fs::write(&policy, "[[notrack]]\nprotocols = [\"udp\"]\nports = [5353]\n").expect("write");
    let outs = parallel(
        &ctg,
        8,
        &["--json", "apply", "--netns", ns.name(), "--timeout", "60s", policy.to_str().expect("utf8")],
    );
    let winners = outs.iter().filter(|o| code(o) == 0).count();
    assert_eq!(winners, 1, "{:?}", outs.iter().map(code).collect::<Vec<_>>());
    let during = ns.nft_list();
    let ours = &during[during.find("table inet ctguard").expect("ctguard's table")..];
    assert!(
        ours.contains("elements = { 5353 }") && !during.contains(&first),
        "a mix of the old and the new policy: {during}"
    );
    ok(&ctg.run(&["--netns", ns.name(), "rollback"]));
    assert_eq!(ns.nft_list(), committed, "the committed policy is not back");
}

/// The record file of `id`, parsed.
fn record(ctg: &Ctg, id: &str) -> Value {
    let p = ctg.base.join("state").join("txn").join(format!("{id}.json"));
    serde_json::from_slice(&std::fs::read(p).expect("record")).expect("record json")
}

/// Sleeps until CLOCK_BOOTTIME reaches `deadline_ns` + `offset_ms` (which may be negative).
fn sleep_until(deadline_ns: u64, offset_ms: i64) {
    let target = (deadline_ns as i128 + i128::from(offset_ms) * 1_000_000) as u64;
    let now = ctguard::journal::boottime_ns();
    if target > now {
        std::thread::sleep(Duration::from_nanos(target - now));
    }
}

/// The final state of `id` once its deadline has certainly passed (or it was committed).
fn settled(ctg: &Ctg, id: &str, deadline_ns: u64) -> String {
    sleep_until(deadline_ns, 300);
    let start = Instant::now();
    loop {
        let s = ctg.state(id);
        if s == "COMMITTED" || s == "ROLLED_BACK" || start.elapsed() > Duration::from_secs(10) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One race: a transaction with a 1 s deadline in a fresh namespace (a policy one in even
/// trials, a ruleset one in odd trials), then `verb` (`confirm` or `extend`) sent at the
/// deadline + `offset_ms`. Checks that the exit code, the journal and the kernel agree;
/// returns the exit code.
fn deadline_trial(ctg: &Ctg, n: usize, verb: &str, offset_ms: i64) -> i32 {
    let ns = Ns::new(&format!("race-{verb}{n}"));
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let marker = "table inet ctguard_marker";
    let (out, id) = if n % 2 == 0 {
        ctg.apply(&ns, &["--timeout", "1s"])
    } else {
        let file = ctg.base.join(format!("marker-{n}.nft"));
        std::fs::write(&file, format!("flush ruleset\n{STATEFUL}{marker} {{\n}}\n")).expect("write");
        ctg.apply(&ns, &["--timeout", "1s", "--ruleset", file.to_str().expect("utf8")])
    };
    ok(&out);
    let changed = |k: &str| k.contains("table inet ctguard");
    let deadline = record(ctg, &id)["deadline"]["boottime_ns"].as_u64().expect("deadline");
    sleep_until(deadline, offset_ms);
    let out = if verb == "confirm" { ctg.run(&["confirm", &id]) } else { ctg.run(&["extend", "--by", "30s", &id]) };
    let c = code(&out);
    let state = settled(ctg, &id, deadline);
    let kernel = ns.nft_list();
    let what = format!("{verb} of {id} at the deadline {offset_ms:+} ms: exit {c}, journal {state}");
    match (verb, c) {
        ("confirm", 0) => {
            assert_eq!(state, "COMMITTED", "{what}");
            assert!(changed(&kernel), "{what}, but the kernel was rolled back");
        }
        ("extend", 0) => {
            assert_eq!(state, "PENDING", "{what}");
            assert!(changed(&kernel), "{what}, but the kernel was rolled back");
            ok(&ctg.run(&["rollback", &id]));
            assert_eq!(ns.nft_list(), before, "{what}: the rollback after the extend");
        }
        (_, 5) => {
            assert_eq!(state, "ROLLED_BACK", "{what}");
            assert_eq!(kernel, before, "{what}, but the kernel is not the prior state");
        }
        _ => panic!("{what}: {}", text(&out)),
    }
    c
}

/// `trials` races, five at a time on one agent, each `trial(ctg, n, offset_ms)` with offsets
/// spread from -50 to +50 ms over the trials; the exit codes, in trial order per thread.
fn race_at_the_deadline(trials: usize, trial: impl Fn(&Ctg, usize, i64) -> i32 + Sync) -> Vec<i32> {
    const PARALLEL: usize = 5;
    let ctg = Ctg::new();
    start_agent(&ctg);
    let trial = &trial;
    let codes: Vec<i32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PARALLEL)
            .map(|i| {
                let ctg = &ctg;
                s.spawn(move || {
                    (0..trials / PARALLEL)
                        .map(|k| {
                            let n = k * PARALLEL + i;
                            let offset = -50 + (n as i64 * 100) / (trials as i64 - 1).max(1);
                            trial(ctg, n, offset)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("trial")).collect()
    });
    assert_eq!(codes.len(), trials);
    codes
}

fn deadline_races(verb: &str, trials: usize) {
    let codes = race_at_the_deadline(trials, |ctg, n, offset| deadline_trial(ctg, n, verb, offset));
    let won = codes.iter().filter(|c| **c == 0).count();
    eprintln!(
        "{verb} at the deadline ±50 ms: {} trials, {won} exit 0, {} exit 5; exit code, journal and kernel agreed in each",
        codes.len(),
        codes.len() - won
    );
}

#[test]
fn thirty_confirms_at_the_deadline_agree_with_journal_and_kernel() {
    deadline_races("confirm", 30);
}

#[test]
fn twenty_extends_at_the_deadline_agree_with_journal_and_kernel() {
    deadline_races("extend", 20);
}

/// Both iptables-nft saves (comment lines dropped) and `nft list ruleset`.
fn ipt_nft_listing(ns: &Ns) -> String {
    let mut s = String::new();
    for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
        for l in ns.exec(tool, &[]).lines().filter(|l| !l.starts_with('#')) {
            s.push_str(l);
            s.push('\n');
        }
    }
    s + &ns.nft_list()
}

/// One race on an iptables-nft host: the policy applied with a 1 s deadline, `confirm` sent at
/// the deadline + `offset_ms`. Exit 0 means COMMITTED with ctguard's chains in the kernel; exit 5
/// means ROLLED_BACK with every save and the nft ruleset as before. Returns the exit code.
fn ipt_nft_confirm_trial(ctg: &Ctg, n: usize, offset_ms: i64) -> i32 {
    let ns = Ns::new(&format!("race-iptc{n}"));
    // A stateful filter in both families and no raw table: apply creates `table ip raw` and
    // `table ip6 raw`, and the deadline's rollback (one batch for both families) removes them.
    ns.exec_stdin("iptables-nft-restore", &["-w"], LEGACY_FW);
    ns.exec_stdin("ip6tables-nft-restore", &["-w"], LEGACY_FW);
    let before = ipt_nft_listing(&ns);
    let policy = ctg.base.join(format!("ipt-nft-{n}.toml"));
    std::fs::write(&policy, "backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n")
        .expect("write policy");
    let (out, id) = ctg.apply(&ns, &[policy.to_str().expect("utf8"), "--timeout", "1s"]);
    ok(&out);
    let deadline = record(ctg, &id)["deadline"]["boottime_ns"].as_u64().expect("deadline");
    sleep_until(deadline, offset_ms);
    let out = ctg.run(&["confirm", &id]);
    let c = code(&out);
    let state = settled(ctg, &id, deadline);
    let kernel = ipt_nft_listing(&ns);
    let what = format!("confirm of {id} (iptables-nft) at the deadline {offset_ms:+} ms: exit {c}, journal {state}");
    match c {
        0 => {
            assert_eq!(state, "COMMITTED", "{what}");
            assert!(kernel.contains("-j CTGUARD-PRE") && kernel.contains("ctstate UNTRACKED"), "{what}, but: {kernel}");
        }
        5 => {
            assert_eq!(state, "ROLLED_BACK", "{what}");
            assert_eq!(kernel, before, "{what}, but the kernel is not the prior state");
        }
        _ => panic!("{what}: {}", text(&out)),
    }
    c
}

#[test]
fn twenty_confirms_at_the_deadline_on_iptables_nft_agree_with_journal_and_kernel() {
    let codes = race_at_the_deadline(20, ipt_nft_confirm_trial);
    let won = codes.iter().filter(|c| **c == 0).count();
    eprintln!("iptables-nft confirm at the deadline ±50 ms: 20 trials, {won} exit 0, {} exit 5", 20 - won);
}

/// A small tmpfs mounted as a state dir for the test's life (unmounted on drop).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&path).expect("mkdir");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "ctguard-test"])
            .arg(&path)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs");
        SmallDisk(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_full_disk_after_the_snapshot_ends_rolled_back_and_never_restores_an_older_state() {
    let ns = Ns::new("race-full");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let disk = SmallDisk::mount(ctg.base.join("state"), "4m");
    // The agent starts with the fault armed: right after PREPARED it fills the state dir.
    let env = [(ctguard::agent::server::FAULT_ENV, "apply:fill-disk")];
    let out = ctg.run_env(&["--json", "apply", "--netns", ns.name(), "--timeout", "30s"], &env);
    eprintln!("apply on a disk that fills up: {}", text(&out).trim());
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("No space left") && text(&out).contains("rolled back"), "{}", text(&out));
    assert_eq!(ns.nft_list(), before, "the kernel is not back to the prior state");
    let h = ctg.json(&["history"]);
    let id = h["transactions"][0]["id"].as_str().expect("journaled").to_string();
    assert_eq!(h["transactions"][0]["state"], "ROLLED_BACK", "{h}");
    // Room again; a hand-made change; the agent killed and a new one started: recovery must
    // not restore the old snapshot over the hand-made change.
    std::fs::remove_file(disk.0.join("txn").join("filler")).expect("filler");
    ns.nft("table ip handmade {\n}\n");
    ctg.signal_agent(nix::sys::signal::Signal::SIGKILL);
    let (out, id2) = ctg.apply(&ns, &["--timeout", "60s"]);
    ok(&out);
    assert!(ns.nft_list().contains("table ip handmade"), "recovery restored an older state");
    ok(&ctg.run(&["rollback", &id2]));
    assert!(ns.nft_list().contains("table ip handmade"));
    assert_eq!(ctg.state(&id), "ROLLED_BACK");
    // The agent stopped (Ctg's drop), then the disk: the installation's dir is removed only
    // once the mount is gone (it stayed behind, a mount point cannot be removed).
    let base = ctg.base.clone();
    drop(ctg);
    drop(disk);
    let _ = std::fs::remove_dir_all(&base);
    assert!(!base.exists(), "{} left behind", base.display());
}

#[test]
fn a_damaged_pending_record_keeps_its_deadline_and_shows_in_status() {
    let ns = Ns::new("race-dmg");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "3s"]);
    ok(&out);
    let path = ctg.base.join("state").join("txn").join(format!("{id}.json"));
    let bytes = std::fs::read(&path).expect("record");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).expect("truncate");
    let status = ctg.json(&["status"]);
    eprintln!("status with a damaged record: {status}");
    assert_eq!(status["pending"][0]["id"].as_str(), Some(id.as_str()), "{status}");
    assert!(
        status["damaged"].as_array().is_some_and(|d| d.iter().any(|e| e.as_str().unwrap_or("").contains(&id))),
        "{status}"
    );
    // The deadline still fires, from the agent's own copy, and writes a whole record again.
    let start = Instant::now();
    while !ctg.run(&["--json", "show", &id]).status.success() || ctg.state(&id) != "ROLLED_BACK" {
        assert!(start.elapsed() < Duration::from_secs(20), "the damaged record was not rolled back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ns.nft_list(), before);
    assert_eq!(ctg.outcome(&id), "rolled back: deadline");
}

/// Opens `n` connections to `sock` and keeps them (idle) until dropped; connects that would
/// block (the listen backlog is full) are kept pending as they are.
fn idle_clients(sock: &std::path::Path, n: usize) -> Vec<std::os::fd::OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(sock).expect("addr");
    let mut v = Vec::new();
    for _ in 0..n {
        let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
            .expect("socket");
        let _ = connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr);
        v.push(fd);
    }
    v
}

#[test]
fn eleven_hundred_idle_clients_under_a_1024_fd_limit_do_not_delay_the_deadline() {
    crate::harness::raise_nofile(2048);
    let ns = Ns::new("race-fds");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    // The agent is started by this apply, under the limit, and inherits it.
    let state = ctg.base.join("state");
    let run = ctg.base.join("run");
    let out = std::process::Command::new("prlimit")
        .arg("--nofile=1024:1024")
        .arg(env!("CARGO_BIN_EXE_ctguard"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--run-dir")
        .arg(&run)
        .args(["--json", "apply", "--netns", ns.name(), "--timeout", "4s"])
        .output()
        .expect("prlimit");
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = v["data"]["txid"].as_str().expect("txid").to_string();
    let deadline = record(&ctg, &id)["deadline"]["boottime_ns"].as_u64().expect("deadline");
    let agent = ctg.agent_pid().expect("the agent answers before the clients come");
    let clients = idle_clients(&run.join("ctguard.sock"), 1100);
    sleep_until(deadline, 0);
    let start = Instant::now();
    while ns.nft_list() != before {
        assert!(start.elapsed() < Duration::from_secs(1), "not rolled back within 1 s of the deadline");
        std::thread::sleep(Duration::from_millis(10));
    }
    let late = start.elapsed();
    drop(clients);
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(10));
    let log = std::fs::metadata(run.join("agent.log")).map(|m| m.len()).unwrap_or(0);
    eprintln!("1,100 idle clients, nofile 1024: kernel restored {late:?} after the deadline; agent log {log} bytes");
    assert!(log < 1 << 20, "agent log {log} bytes");
    // The same agent still runs, and serves again once it has closed the 1,100 connections
    // (a status asks with a 2 s timeout: on a loaded CI machine the first one can miss it).
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), None).is_ok(), "the agent died");
    let start = Instant::now();
    while ctg.agent_pid() != Some(agent) {
        assert!(start.elapsed() < Duration::from_secs(15), "the agent ({agent}) no longer answers");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A prepare that takes longer than the detached agent's idle time (20k host rules): the agent
/// started by this very apply must not exit under it ("nothing pending").
#[test]
fn a_long_prepare_on_a_20k_rule_target_keeps_the_fresh_agent() {
    let ns = Ns::new("race-big");
    ns.nft(STATEFUL);
    let mut script = String::from("table inet big {\n  chain blocklist {\n");
    for i in 0..20_000u32 {
        script.push_str(&format!("    ip saddr 10.{}.{}.{} counter drop\n", i >> 16, (i >> 8) & 255, i & 255));
    }
    script.push_str("  }\n}\n");
    ns.nft(&script);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    assert!(ctg.agent_pid().is_none());
    let start = Instant::now();
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s"]);
    let took = start.elapsed();
    eprintln!("apply on a 20k-rule target with no agent running: {took:?}");
    ok(&out);
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ns.nft_list(), before);
    // No pin left behind keeping the namespace alive.
    assert_eq!(std::fs::read_dir(ctg.base.join("run").join("ns")).map(|d| d.count()).unwrap_or(0), 0);
}

/// A legacy rollback that cannot get the xtables lock (held 15 s by someone else) is retried,
/// logged and shown in `status` until it succeeds; the prior state comes back exactly. The
/// lock is this test's own (`XTABLES_LOCKFILE`), so the host's iptables users never wait.
#[test]
fn a_legacy_rollback_behind_a_held_xtables_lock_is_retried_and_shown_until_it_succeeds() {
    let ns = Ns::new("race-xt");
    let rules = "*filter\n:INPUT DROP [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -p udp -m udp --dport 53 -m conntrack --ctstate NEW -j ACCEPT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n";
    // Legacy tables cannot be unregistered once used: the raw table exists before, as on a
    // host that ever used it.
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    ns.exec_stdin("iptables-legacy-restore", &["-w"], &format!("{rules}{raw}"));
    let save = |ns: &Ns| {
        ns.exec("iptables-legacy-save", &[]).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
    };
    let before = (save(&ns), ns.nft_list());
    let mut ctg = Ctg::new();
    std::fs::create_dir_all(&ctg.base).expect("base");
    let lockfile = ctg.base.join("xtables.lock");
    ctg.env.push(("XTABLES_LOCKFILE".into(), lockfile.display().to_string()));
    let policy = ctg.base.join("legacy.toml");
    std::fs::write(&policy, "backend = \"iptables-legacy\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n")
        .expect("policy");
    let (out, id) = ctg.apply(&ns, &["--timeout", "2s", policy.to_str().expect("utf8")]);
    ok(&out);
    assert!(save(&ns).contains("CTGUARD"), "{}", save(&ns));
    // Someone holds the xtables lock across the deadline for 15 s.
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lockfile).expect("lock");
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    let t0 = Instant::now();
    // The first attempt waits its bound (5 s) and fails; status shows the owed rollback.
    let mut seen = None;
    while t0.elapsed() < Duration::from_secs(14) {
        let st = ctg.json(&["status"]);
        if st["pending"][0]["phase"] == "rollback owed" {
            seen = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = seen.unwrap_or_else(|| {
        let log = std::fs::read_to_string(ctg.base.join("run").join("agent.log")).unwrap_or_default();
        panic!("status never showed the owed rollback: {}\n{log}", ctg.json(&["status"]))
    });
    eprintln!("xtables lock held: {}", st["pending"][0]);
    assert!(st["pending"][0]["rollback_error"].as_str().unwrap_or("").contains("xtables lock"), "{st}");
    assert_eq!(ctg.state(&id), "ROLLBACK_FAILED");
    assert!(save(&ns).contains("CTGUARD"), "nothing may be half rolled back while the lock is held");
    while t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(held);
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(40));
    let done = t0.elapsed();
    assert_eq!((save(&ns), ns.nft_list()), before, "not the prior state");
    let log = std::fs::read_to_string(ctg.base.join("run").join("agent.log")).unwrap_or_default();
    let retries = log.matches("retrying the rollback").count();
    eprintln!("legacy rollback behind a 15 s xtables lock: rolled back {done:?} after the lock was taken, {retries} retries logged");
    assert!(retries >= 1, "{log}");
}

/// A foreign nft change between ctguard's read and its commit: re-read and re-planned (the
/// journal says so), and refused with exit 3 naming the change when it keeps happening.
#[test]
fn a_foreign_change_between_read_and_commit_is_retried_then_refused() {
    let ns = Ns::new("race-cas");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    // Once: the second attempt goes through.
    let env = [(ctguard::agent::server::FAULT_ENV, "prepare:foreign-change*1")];
    let out = ctg.run_env(&["--json", "apply", "--netns", ns.name(), "--timeout", "60s"], &env);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = v["data"]["txid"].as_str().expect("txid").to_string();
    let show = ctg.json(&["show", &id]);
    let events = show["events"].to_string();
    assert!(events.contains("attempt 1 refused"), "{show}");
    ok(&ctg.run(&["rollback", &id]));
    // Stop this agent: the next one starts with the fault on every attempt.
    let pid = ctg.signal_agent(nix::sys::signal::Signal::SIGTERM);
    assert!(super::txn_cli::wait_gone(pid, Duration::from_secs(5)));
    let before = ns.nft_list();
    let env = [(ctguard::agent::server::FAULT_ENV, "prepare:foreign-change")];
    let out = ctg.run_env(&["--json", "apply", "--netns", ns.name(), "--timeout", "60s"], &env);
    eprintln!("a foreign change at every attempt: {}", text(&out).trim());
    assert_eq!(code(&out), 3, "{}", text(&out));
    assert!(text(&out).contains("gave up after 3 attempts"), "{}", text(&out));
    assert!(text(&out).contains(ctguard::fault::FOREIGN_TABLE), "the refusal names the change: {}", text(&out));
    // Nothing of ctguard's is left; the foreign writer's table is (it is not ctguard's to undo).
    let after = ns.nft_list();
    assert!(!after.contains("table inet ctguard") && !after.contains("ctguard:"), "{after}");
    assert!(after.contains(ctguard::fault::FOREIGN_TABLE), "{after}");
    let _ = before;
}

/// `--netns` naming a FIFO, sent straight to the agent (no CLI check in between): refused at
/// once, and another target's deadline fires on time meanwhile.
#[test]
fn a_fifo_as_netns_is_refused_at_once_and_never_delays_another_deadline() {
    use ctguard::agent::protocol::{ApplyRequest, Request};
    let ns = Ns::new("race-fifo");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "2s"]);
    ok(&out);
    let deadline = record(&ctg, &id)["deadline"]["boottime_ns"].as_u64().expect("deadline");
    let fifo = ctg.base.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let req = Request::Apply(ApplyRequest {
        netns: Some(fifo.display().to_string()),
        timeout_secs: 60,
        ..Default::default()
    });
    let t = Instant::now();
    let r = ctguard::agent::client::request(&ctg.base.join("run"), req, Duration::from_secs(30)).expect("answer");
    let took = t.elapsed();
    eprintln!("--netns FIFO straight to the agent: exit {} in {took:?}: {:?}", r.exit, r.error);
    assert_eq!(r.exit, 2, "{r:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(r.error.unwrap_or_default().contains("not a network namespace"));
    sleep_until(deadline, 0);
    let start = Instant::now();
    while ns.nft_list() != before {
        assert!(start.elapsed() < Duration::from_secs(1), "the other target's deadline was late");
        std::thread::sleep(Duration::from_millis(10));
    }
    ctg.wait_state(&id, "ROLLED_BACK", Duration::from_secs(5));
    assert!(std::fs::read_dir(ctg.base.join("run").join("ns")).map(|d| d.count()).unwrap_or(0) == 0, "a pin was left");
}

/// `extend` is bounded (issue 14): the deadline at most 7 days from now, checked arithmetic
/// (a raw request with `u64::MAX` seconds once wrapped in release builds).
#[test]
fn extend_is_bounded_and_never_wraps() {
    use ctguard::agent::protocol::Request;
    let ns = Ns::new("race-ext");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s"]);
    ok(&out);
    let deadline = record(&ctg, &id)["deadline"]["boottime_ns"].as_u64().expect("deadline");
    let out = ctg.run(&["extend", "--by", "8d", &id]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    for by_secs in [u64::MAX, u64::MAX / 1_000_000_000, 7 * 24 * 3600] {
        let req = Request::Extend { txid: Some(id.clone()), by_secs, netns: None };
        let r = ctguard::agent::client::request(&ctg.base.join("run"), req, Duration::from_secs(10)).expect("answer");
        assert_eq!(r.exit, 2, "extend by {by_secs} s: {r:?}");
    }
    assert_eq!(record(&ctg, &id)["deadline"]["boottime_ns"].as_u64(), Some(deadline), "the deadline moved");
    ok(&ctg.run(&["extend", "--by", "1h", &id]));
    ok(&ctg.run(&["rollback", &id]));
}

/// `confirm --netns X` / `rollback --netns X` without a TXID act on X's pending transaction
/// (issue 15), and a second `ctguard agent` on the same dirs says why it exits (exit 4).
#[test]
fn netns_selects_the_pending_transaction_and_a_second_agent_says_why() {
    let (a, b) = (Ns::new("sel-a"), Ns::new("sel-b"));
    a.nft(STATEFUL);
    b.nft(STATEFUL);
    let ctg = Ctg::new();
    let (out, ida) = ctg.apply(&a, &["--timeout", "60s"]);
    ok(&out);
    let (out, idb) = ctg.apply(&b, &["--timeout", "60s"]);
    ok(&out);
    // Without --netns two are pending: the CLI must be told which.
    let out = ctg.run(&["confirm"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    ok(&ctg.run(&["--netns", a.name(), "confirm"]));
    assert_eq!((ctg.state(&ida), ctg.state(&idb)), ("COMMITTED".to_string(), "PENDING".to_string()));
    ok(&ctg.run(&["--netns", b.name(), "rollback"]));
    assert_eq!(ctg.state(&idb), "ROLLED_BACK");
    // The agent that serves these dirs is running: a second one refuses, saying so.
    let second = ctg.run(&["agent"]);
    assert_eq!(code(&second), 4, "{}", text(&second));
    assert!(text(&second).contains("already serves"), "{}", text(&second));
}
