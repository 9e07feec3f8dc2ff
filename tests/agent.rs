//! The agent's state machine, timer, journal and socket, driven by a fake engine (no
//! netfilter): each test runs its own agent in a thread with its own run and state dirs.
//! Needs root (the agent pins the target namespace with a bind mount).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctguard::agent::client;
use ctguard::agent::engine::{ApplyInput, Engine, EngineError, Prepared, Undo};
use ctguard::agent::protocol::{ApplyRequest, Request, Response};
use ctguard::agent::server::{self, AgentOptions};
use ctguard::backend::policy_txn::PolicyUndo;
use ctguard::exit::Exit;
use ctguard::journal::{self, Journal};
use ctguard::txn::{self, Kind, Reason, Requester, State, TargetRecord, TxnId, TxnRecord};

#[derive(Default)]
struct FakeState {
    applied: Vec<String>,
    rollbacks: u32,
    fail_prepare: Option<(Exit, String)>,
    fail_rollback: u32,
    /// Lines of the listings before and after (0: the short ones).
    listing_lines: usize,
}

/// A listing like nft's, `lines` long.
fn big_listing(tag: &str, lines: usize) -> String {
    (0..lines).map(|i| format!("\t\tip saddr @trusted4 tcp dport {} ct state new accept # {tag}\n", 1024 + i)).collect()
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

struct FakePrepared {
    tag: String,
    state: Arc<Mutex<FakeState>>,
}

impl Prepared for FakePrepared {
    fn planned_undo(&self) -> Undo {
        Undo::Policy(Box::new(PolicyUndo::empty(&self.tag)))
    }
    fn before(&self) -> String {
        big_listing("before", self.state.lock().expect("lock").listing_lines)
    }
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
    fn apply(self: Box<Self>) -> Result<Undo, EngineError> {
        self.state.lock().expect("lock").applied.push(self.tag.clone());
        Ok(Undo::Policy(Box::new(PolicyUndo::empty(&self.tag))))
    }
}

impl Engine for Fake {
    fn prepare(&self, input: &ApplyInput) -> Result<Box<dyn Prepared>, EngineError> {
        if let Some((exit, message)) = self.0.lock().expect("lock").fail_prepare.clone() {
            return Err(EngineError::new(exit, message));
        }
        Ok(Box::new(FakePrepared { tag: input.tag.to_string(), state: self.0.clone() }))
    }
    fn check_rollback(&self, _undo: &Undo) -> Result<(), EngineError> {
        Ok(())
    }
    fn rollback(&self, undo: &Undo) -> Result<(), EngineError> {
        let mut s = self.0.lock().expect("lock");
        s.rollbacks += 1;
        if s.fail_rollback > 0 {
            s.fail_rollback -= 1;
            return Err(EngineError::new(Exit::RollbackFailed, "injected failure"));
        }
        let tag = match undo {
            Undo::Policy(p) => p.tag.clone(),
            Undo::Ruleset(_) => String::new(),
        };
        s.applied.retain(|t| *t != tag);
        Ok(())
    }
    fn listing(&self, _undo: &Undo) -> Result<String, EngineError> {
        let s = self.0.lock().expect("lock");
        if s.listing_lines > 0 {
            return Ok(big_listing("after", s.listing_lines));
        }
        Ok(s.applied.join("\n"))
    }
}

struct TestAgent {
    run_dir: PathBuf,
    state_dir: PathBuf,
    fake: Fake,
    thread: Option<std::thread::JoinHandle<()>>,
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Fails `test` when not run as root (the agent pins its target namespace with a bind mount):
/// a test that passed without running would hide a broken agent.
fn require_root(test: &str) {
    assert!(is_root(), "{test}: needs root (the agent pins the target namespace with a bind mount)");
}

impl TestAgent {
    fn start(fake: Fake) -> TestAgent {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let base = std::env::temp_dir().join(format!("ctguard-agent-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (run_dir, state_dir) = (base.join("run"), base.join("state"));
        let mut a = TestAgent { run_dir, state_dir, fake, thread: None };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let opts = AgentOptions {
            run_dir: self.run_dir.clone(),
            state_dir: self.state_dir.clone(),
            detached: true,
            idle_exit: Duration::from_millis(300),
        };
        let engine = self.fake.clone();
        self.thread = Some(std::thread::spawn(move || {
            let engine = Arc::new(engine);
            let engines = ctguard::agent::engine::Engines { policy: engine.clone(), ruleset: engine };
            if let Err(e) = server::run(opts, engines) {
                panic!("agent: {e}");
            }
        }));
        let start = Instant::now();
        while !client::is_running(&self.run_dir) {
            assert!(start.elapsed() < Duration::from_secs(10), "agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like the CLI: a detached agent that exited (nothing pending) is started again.
    fn ask(&mut self, req: Request) -> Response {
        if !client::is_running(&self.run_dir) {
            self.join();
            self.spawn();
        }
        client::request(&self.run_dir, req, Duration::from_secs(30)).expect("request")
    }

    fn apply(&mut self, timeout_secs: u64) -> Response {
        self.ask(Request::Apply(ApplyRequest {
            policy_text: None,
            policy_format: None,
            netns: None,
            timeout_secs,
            force: false,
            ssh: None,
            ruleset: None,
            ..Default::default()
        }))
    }

    fn journal(&self) -> Journal {
        Journal::open(&self.state_dir).expect("journal")
    }

    fn state_of(&self, txid: &str) -> State {
        self.journal().load(&TxnId::parse(txid).expect("id")).expect("record").state
    }

    /// Waits for the detached agent to exit (nothing pending, idle).
    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            t.join().expect("agent thread");
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // Leave nothing pending so the agent exits, then remove the dirs and any pins.
        for r in self.journal().unfinished().unwrap_or_default() {
            let _ = client::request(
                &self.run_dir,
                Request::Rollback { txid: Some(r.id.to_string()), netns: None },
                Duration::from_secs(10),
            );
            if let Some(p) = &r.target.pin {
                ctguard::netns::unpin(std::path::Path::new(p));
            }
        }
        if !std::thread::panicking() {
            self.join();
        }
        if let Some(base) = self.run_dir.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

fn txid(r: &Response) -> String {
    assert_eq!(r.exit, 0, "{r:?}");
    r.data["txid"].as_str().expect("txid").to_string()
}

#[test]
fn deadline_rolls_back_and_measures_slip() {
    require_root("deadline_rolls_back_and_measures_slip");
    let mut a = TestAgent::start(Fake::default());
    let r = a.apply(1);
    let id = txid(&r);
    assert_eq!(a.fake.0.lock().expect("lock").applied.len(), 1);
    assert_eq!(a.state_of(&id), State::Pending);
    let start = Instant::now();
    while a.state_of(&id) == State::Pending {
        assert!(start.elapsed() < Duration::from_secs(5), "no rollback after the deadline");
        std::thread::sleep(Duration::from_millis(5));
    }
    let slip = start.elapsed().saturating_sub(Duration::from_secs(1));
    eprintln!(
        "deadline -> rolled back observed after {:?} (timeout 1 s; slip upper bound {:?})",
        start.elapsed(),
        slip
    );
    assert_eq!(a.state_of(&id), State::RolledBack { reason: Reason::Deadline });
    assert!(a.fake.0.lock().expect("lock").applied.is_empty());
    // Confirming now says it was rolled back (exit 5).
    let c = a.ask(Request::Confirm { txid: Some(id), netns: None });
    assert_eq!(c.exit, Exit::RolledBack.code(), "{c:?}");
}

#[test]
fn confirm_keeps_the_change_past_the_deadline() {
    require_root("confirm_keeps_the_change_past_the_deadline");
    let mut a = TestAgent::start(Fake::default());
    let id = txid(&a.apply(1));
    let c = a.ask(Request::Confirm { txid: None, netns: None });
    assert_eq!(c.exit, 0, "{c:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(a.state_of(&id), State::Committed);
    assert_eq!(a.fake.0.lock().expect("lock").applied.len(), 1);
    // Confirming a committed transaction again is fine (exit 0).
    assert_eq!(a.ask(Request::Confirm { txid: Some(id), netns: None }).exit, 0);
}

#[test]
fn second_apply_on_the_same_target_is_busy() {
    require_root("second_apply_on_the_same_target_is_busy");
    let mut a = TestAgent::start(Fake::default());
    let id = txid(&a.apply(60));
    let r = a.apply(60);
    assert_eq!(r.exit, Exit::Busy.code(), "{r:?}");
    assert_eq!(r.data["pending"].as_str(), Some(id.as_str()));
    assert!(r.error.as_deref().is_some_and(|e| e.contains("s left")), "{r:?}");
}

#[test]
fn extend_then_rollback_now() {
    require_root("extend_then_rollback_now");
    let mut a = TestAgent::start(Fake::default());
    let id = txid(&a.apply(2));
    let e = a.ask(Request::Extend { txid: Some(id.clone()), by_secs: 60, netns: None });
    assert_eq!(e.exit, 0, "{e:?}");
    assert!(e.data["seconds_left"].as_u64().is_some_and(|s| s > 55), "{e:?}");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(a.state_of(&id), State::Pending, "the old deadline still fired");
    let r = a.ask(Request::Rollback { txid: Some(id.clone()), netns: None });
    assert_eq!(r.exit, 0, "{r:?}");
    // rollback returns when the effect is complete.
    assert_eq!(a.state_of(&id), State::RolledBack { reason: Reason::Cancelled });
    assert!(a.fake.0.lock().expect("lock").applied.is_empty());
    let e = a.ask(Request::Extend { txid: Some(id), by_secs: 10, netns: None });
    assert_eq!(e.exit, Exit::RolledBack.code());
}

#[test]
fn prepare_failure_changes_nothing_and_keeps_its_exit_code() {
    require_root("prepare_failure_changes_nothing_and_keeps_its_exit_code");
    let fake = Fake::default();
    fake.0.lock().expect("lock").fail_prepare = Some((Exit::Refused, "lint found 1 error".into()));
    let mut a = TestAgent::start(fake);
    let r = a.apply(10);
    assert_eq!(r.exit, Exit::Refused.code(), "{r:?}");
    assert!(a.journal().list().expect("list").is_empty());
    assert!(a.fake.0.lock().expect("lock").applied.is_empty());
    assert!(std::fs::read_dir(a.run_dir.join("ns")).map(|d| d.count()).unwrap_or(0) == 0, "pin left behind");
}

#[test]
fn rollback_failure_is_exit_7_and_retried() {
    require_root("rollback_failure_is_exit_7_and_retried");
    let fake = Fake::default();
    fake.0.lock().expect("lock").fail_rollback = 1;
    let mut a = TestAgent::start(fake);
    let id = txid(&a.apply(60));
    let r = a.ask(Request::Rollback { txid: Some(id.clone()), netns: None });
    assert_eq!(r.exit, Exit::RollbackFailed.code(), "{r:?}");
    assert!(matches!(a.state_of(&id), State::RollbackFailed { attempts: 1, .. }));
    // The agent retries with backoff (1 s for the first retry).
    let start = Instant::now();
    while !a.state_of(&id).is_finished() {
        assert!(start.elapsed() < Duration::from_secs(5), "no retry");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(a.state_of(&id), State::RolledBack { .. }));
    assert_eq!(a.fake.0.lock().expect("lock").rollbacks, 2);
}

fn record(journal: &Journal, boot_id: &str, state_pending: bool, deadline_in: Duration) -> TxnRecord {
    let me = std::fs::metadata("/proc/self/ns/net").expect("ns");
    use std::os::unix::fs::MetadataExt;
    let id = journal.fresh_id(1_700_000_000).expect("id");
    let target = TargetRecord {
        label: "caller".into(),
        path: "/proc/self/ns/net".into(),
        pin: None,
        dev: me.dev(),
        ino: me.ino(),
    };
    let mut rec = TxnRecord::new(
        id,
        Kind::Policy,
        target,
        Requester { uid: 0, pid: 1, ssh: None, origin: None, person: None },
        boot_id.into(),
        1_700_000_000,
    );
    rec.undo = Undo::Policy(Box::new(PolicyUndo::empty(&format!("ctguard:{}", rec.id)))).to_value();
    if state_pending {
        let d = txn::Deadline {
            boottime_ns: journal::boottime_ns() + deadline_in.as_nanos() as u64,
            boot_id: boot_id.into(),
            wall_unix: 1_700_000_100,
        };
        rec.to_pending(d, 1_700_000_001).expect("pending");
    }
    journal.write(&rec).expect("write");
    rec
}

#[test]
fn recovery_on_start_closes_other_boots_and_rolls_back_prepared() {
    require_root("recovery_on_start_closes_other_boots_and_rolls_back_prepared");
    let fake = Fake::default();
    let base = std::env::temp_dir().join(format!("ctguard-agent-recover-{}", std::process::id()));
    let state = base.join("state");
    let j = Journal::open(&state).expect("journal");
    let boot = journal::boot_id().expect("boot id");
    let rebooted = record(&j, "another-boot-id", true, Duration::from_secs(60));
    let prepared = record(&j, &boot, false, Duration::ZERO);
    let overdue = {
        let mut r = record(&j, &boot, false, Duration::ZERO);
        let d = txn::Deadline { boottime_ns: 1, boot_id: boot.clone(), wall_unix: 1 };
        r.to_pending(d, 1_700_000_001).expect("pending");
        j.write(&r).expect("write");
        r
    };
    let rearm = record(&j, &boot, true, Duration::from_secs(1));
    let mut a = TestAgent { run_dir: base.join("run"), state_dir: state.clone(), fake: fake.clone(), thread: None };
    a.spawn();
    assert_eq!(a.state_of(rebooted.id.as_str()), State::RolledBack { reason: Reason::Reboot });
    assert_eq!(a.state_of(prepared.id.as_str()), State::RolledBack { reason: Reason::Recovered });
    assert_eq!(a.state_of(overdue.id.as_str()), State::RolledBack { reason: Reason::Recovered });
    assert_eq!(a.state_of(rearm.id.as_str()), State::Pending);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(a.state_of(rearm.id.as_str()), State::RolledBack { reason: Reason::Deadline });
    // Rebooted: nothing restored (the fake's rollback was called for the other three only).
    assert_eq!(fake.0.lock().expect("lock").rollbacks, 3);
    a.join();
}

#[test]
fn agent_refuses_other_protocol_versions_and_garbage() {
    require_root("agent_refuses_other_protocol_versions_and_garbage");
    use std::io::{BufRead, BufReader, Write};
    let a = TestAgent::start(Fake::default());
    for line in ["{\"v\":99,\"op\":\"ping\"}\n", "not json\n"] {
        let mut s = std::os::unix::net::UnixStream::connect(client::socket_path(&a.run_dir)).expect("connect");
        s.write_all(line.as_bytes()).expect("write");
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).expect("read");
        let r: Response = serde_json::from_str(&answer).expect("response");
        assert_eq!(r.exit, Exit::BadInput.code(), "{line}: {r:?}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(client::socket_path(&a.run_dir)).expect("socket").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// The agent holds a pending record with its listings compressed (issue 16): every journal
/// write made from that held copy (extend, rollback; confirm in a second transaction) still
/// carries the listings byte for byte.
#[test]
fn large_listings_survive_the_compressed_in_memory_record() {
    assert!(is_root(), "needs root: the agent pins the target namespace with a bind mount");
    let lines = 20_000;
    let fake = Fake::default();
    fake.0.lock().expect("lock").listing_lines = lines;
    let mut a = TestAgent::start(fake);
    let (before, after) = (big_listing("before", lines), big_listing("after", lines));
    let load = |a: &TestAgent, id: &str| a.journal().load(&TxnId::parse(id).expect("id")).expect("record");
    let id = txid(&a.apply(60));
    let r = load(&a, &id);
    assert_eq!((r.before.as_deref(), r.after.as_deref()), (Some(before.as_str()), Some(after.as_str())));
    let e = a.ask(Request::Extend { txid: Some(id.clone()), netns: None, by_secs: 60 });
    assert_eq!(e.exit, 0, "{e:?}");
    let r = load(&a, &id);
    assert_eq!(r.state, State::Pending);
    assert_eq!((r.before.as_deref(), r.after.as_deref()), (Some(before.as_str()), Some(after.as_str())));
    let rb = a.ask(Request::Rollback { txid: Some(id.clone()), netns: None });
    assert_eq!(rb.exit, 0, "{rb:?}");
    let r = load(&a, &id);
    assert_eq!(r.state, State::RolledBack { reason: Reason::Cancelled });
    assert_eq!((r.before.as_deref(), r.after.as_deref()), (Some(before.as_str()), Some(after.as_str())));
    let id2 = txid(&a.apply(60));
    let c = a.ask(Request::Confirm { txid: Some(id2.clone()), netns: None });
    assert_eq!(c.exit, 0, "{c:?}");
    let r = load(&a, &id2);
    assert_eq!(r.state, State::Committed);
    assert_eq!((r.before.as_deref(), r.after.as_deref()), (Some(before.as_str()), Some(after.as_str())));
}
