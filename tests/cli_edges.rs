//! The rough edges a first user hits, through the real binary: a closed stdout, the one JSON
//! envelope of every verb, "run ctguard as root", the order of `history`, the man page, and
//! seed-era sysctl names. Nothing here touches a firewall: verbs that read live state run in a
//! network namespace of their own (as root) and the transaction verbs are given bad input or
//! an empty journal (apply and confirm succeeding under `--json` are checked in
//! `integration/kernel`, where every `Ctg::json` call checks the envelope).

mod common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh state dir, run dir and scratch files, removed on drop.
struct Dirs(PathBuf);

impl Dirs {
    fn new(label: &str) -> Dirs {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ctguard-edges-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Dirs(p)
    }
    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
    fn run(&self) -> PathBuf {
        self.0.join("run")
    }
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }
    /// `ctguard --state-dir … --run-dir … ARGS`, stdout as given.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ctguard"));
        c.arg("--state-dir")
            .arg(self.state())
            .arg("--run-dir")
            .arg(self.run())
            .args(args)
            .env_remove("SSH_CONNECTION")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        c
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `c` from a thread in a network namespace of its own when root (so `plan` reads an
/// empty namespace, never the host's); as is otherwise.
fn output_isolated(mut c: Command) -> Output {
    if !common::is_root() {
        return c.output().expect("run ctguard");
    }
    common::in_fresh_netns("edges", move || c.output().expect("run ctguard"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!("exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), text(&o.stdout), text(&o.stderr))
}

const POLICY: &str = "[[notrack]]\nprotocols = [\"udp\"]\nports = [5353]\n";
const BAD_POLICY: &str = "[[notrack]]\nprotocols = [\"udp\"]\nports = [70000]\n";
const UNKNOWN_TXID: &str = "20261204-031331-7199";

// ---------------------------------------------------------------------------------------------
// `ctguard history | head -1` panicked with a backtrace, exit 101

/// A pipe whose read end is already closed: every write to the other end fails with EPIPE.
fn closed_pipe() -> OwnedFd {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    write
}

#[test]
fn history_piped_to_head_panics_no_more_a_closed_stdout_ends_every_verb_quietly() {
    let d = Dirs::new("epipe");
    let policy = d.file("p.toml", POLICY);
    let cases: Vec<Vec<&str>> = vec![
        vec!["history"],
        vec!["--json", "history"],
        vec!["status"],
        vec!["--json", "status"],
        vec!["show", UNKNOWN_TXID],
        vec!["--json", "show", UNKNOWN_TXID],
        vec!["render", &policy],
        vec!["--json", "render", &policy],
        vec!["plan", &policy],
        vec!["--json", "plan", &policy],
        vec!["man"],
        vec!["completions", "bash"],
        vec!["recover"],
        vec!["--json", "no-such-verb"],
    ];
    for args in cases {
        let plain = output_isolated(d.cmd(&args));
        let mut c = d.cmd(&args);
        c.stdout(Stdio::from(closed_pipe())).stderr(Stdio::piped());
        let closed = output_isolated(c);
        let err = text(&closed.stderr);
        eprintln!("{args:?}: exit {:?} (closed stdout: {:?})", plain.status.code(), closed.status.code());
        assert!(!err.contains("panicked"), "{args:?} panicked on a closed stdout: {err}");
        assert_eq!(closed.status.code(), plain.status.code(), "{args:?}: {err}\nwithout the pipe: {}", show(&plain));
        if plain.status.success() {
            assert!(err.is_empty(), "{args:?}: a closed stdout is not worth a word: {err}");
            assert!(!plain.stdout.is_empty(), "{args:?} printed nothing: the test proves nothing");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `--json` had two shapes, and some errors printed nothing on stdout

/// The one envelope on stdout: exactly `exit` (= the exit code), `error` (null exactly on
/// success) and `data`; one JSON document and nothing else.
fn envelope(args: &[&str], o: &Output) -> Value {
    let out = text(&o.stdout);
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not one JSON document ({e}): {}", show(o)));
    let keys: Vec<&String> = v.as_object().map(|m| m.keys().collect()).unwrap_or_default();
    assert_eq!(keys, ["data", "error", "exit"], "{args:?}: not the envelope: {out}");
    assert_eq!(v["exit"].as_i64().map(|c| c as i32), o.status.code(), "{args:?}: {out}");
    if o.status.success() {
        assert!(v["error"].is_null(), "{args:?}: {out}");
    } else {
        let e = v["error"].as_str().unwrap_or_else(|| panic!("{args:?}: no error: {out}"));
        // The same message as the human line on stderr.
        let first = text(&o.stderr).lines().find_map(|l| l.strip_prefix("ctguard: error: ").map(str::to_string));
        let first = first.unwrap_or_else(|| panic!("{args:?}: no error line on stderr: {}", show(o)));
        assert!(e.starts_with(&first) || first.contains(e), "{args:?}: {e:?} vs stderr {first:?}");
    }
    v
}

#[test]
fn json_has_one_shape_every_verb_prints_one_envelope_on_success_and_on_error() {
    let d = Dirs::new("json");
    let good = d.file("good.toml", POLICY);
    let bad = d.file("bad.toml", BAD_POLICY);
    let persisted_missing = d.0.join("nope.toml").display().to_string();
    let is_root = common::is_root();
    // (arguments, expected exit code, what `data` must hold on success)
    let mut cases: Vec<(Vec<&str>, i32, Option<&str>)> = vec![
        (vec!["render", &good], 0, Some("text")),
        (vec!["render", &bad], 2, None),
        (vec!["plan", &bad], 2, None),
        (vec!["apply", &bad], 2, None),
        (vec!["apply", "--timeout", "forever", &good], 2, None),
        (vec!["confirm", "not-a-txid"], 2, None),
        (vec!["extend", "--by", "soon", UNKNOWN_TXID], 2, None),
        (vec!["rollback", "not-a-txid"], 2, None),
        (vec!["show", UNKNOWN_TXID], 2, None),
        (vec!["show", "not-a-txid"], 2, None),
        (vec!["doctor", "--netns", "ctg-edges-no-such-ns"], 2, None),
        (vec!["restore", "--policy-file", &persisted_missing], 2, None),
        (vec!["man"], 0, Some("text")),
        (vec!["completions", "zsh"], 0, Some("text")),
        (vec!["completions", "tcsh"], 2, None),
        (vec!["no-such-verb"], 2, None),
        (vec!["history", "--no-such-flag"], 2, None),
    ];
    if is_root {
        cases.extend([
            (vec!["plan", &good], 0, Some("changed")),
            (vec!["status"], 0, Some("pending")),
            (vec!["history"], 0, Some("transactions")),
            (vec!["recover"], 0, Some("closed_by_reboot")),
            (vec!["restore"], 0, Some("persisted")),
        ]);
    }
    for (args, code, key) in cases {
        let mut a = vec!["--json"];
        a.extend_from_slice(&args);
        let o = output_isolated(d.cmd(&a));
        let v = envelope(&a, &o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", show(&o));
        match key {
            Some(k) => assert!(!v["data"][k].is_null(), "{args:?}: data lacks {k}: {v}"),
            None => assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{args:?}: {v}"),
        }
    }
    // A verb that reports and then fails keeps its report: plan with a lint error (3).
    if is_root {
        let blackhole =
            d.file("blackhole.toml", "[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\naccept_untracked = false\n");
        let a = ["--json", "plan", blackhole.as_str()];
        let o = output_isolated(d.cmd(&a));
        let v = envelope(&a, &o);
        eprintln!("plan without accept_untracked: exit {:?}, error {}", o.status.code(), v["error"]);
        if o.status.code() == Some(3) {
            assert!(v["data"]["findings"].is_array(), "{v}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Without root: exit 1, 2 or 6 and "EPERM", never "run as root"

fn as_nobody(d: &Dirs, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_ctguard"))
        .arg("--state-dir")
        .arg(d.state())
        .arg("--run-dir")
        .arg(d.run())
        .args(args)
        .env_remove("SSH_CONNECTION")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv")
}

fn nobody_can_read(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn without_root_the_error_says_run_ctguard_as_root_exit_2() {
    common::require_root("without_root_the_error_says_run_ctguard_as_root_exit_2");
    let d = Dirs::new("nobody");
    nobody_can_read(&d.0);
    let good = d.file("good.toml", POLICY);
    let bad = d.file("bad.toml", BAD_POLICY);
    let needs_root: Vec<Vec<&str>> = vec![
        vec!["history"],
        vec!["status"],
        vec!["show", UNKNOWN_TXID],
        vec!["apply", &good],
        vec!["confirm"],
        vec!["extend", "--by", "1m"],
        vec!["rollback"],
        vec!["doctor"],
        vec!["recover"],
        vec!["restore"],
        vec!["agent"],
        vec!["plan", &good],
        vec!["plan", "--netns", "/proc/1/ns/net"],
        vec!["--json", "status"],
    ];
    for args in &needs_root {
        let o = as_nobody(&d, args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", show(&o));
        assert!(err.contains("run ctguard as root"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("ctguard: error: "), "{args:?}: {err}");
        assert!(!err.contains("EPERM") && !err.contains("owned by uid"), "{args:?}: the cause is root: {err}");
    }
    assert!(!d.state().exists() && !d.run().exists(), "nothing may be created without root");
    // Nothing else needs root; plan validates the policy before it asks for root.
    for args in [vec!["render", good.as_str()], vec!["man"], vec!["completions", "bash"], vec!["--version"]] {
        let o = as_nobody(&d, &args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", show(&o));
    }
    let o = as_nobody(&d, &["plan", &bad]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(text(&o.stderr).contains("70000 is not a port"), "{}", show(&o));
}

#[test]
fn root_without_the_capabilities_is_told_to_run_as_root_not_given_eperm() {
    common::require_root("root_without_the_capabilities_is_told_to_run_as_root_not_given_eperm");
    let d = Dirs::new("nocaps");
    let good = d.file("good.toml", POLICY);
    // uid 0 without CAP_SYS_ADMIN and CAP_NET_ADMIN (a container): setns is EPERM.
    let o = Command::new("setpriv")
        .args(["--bounding-set=-sys_admin,-net_admin", "--inh-caps=-sys_admin,-net_admin", "--"])
        .arg(env!("CARGO_BIN_EXE_ctguard"))
        .args(["plan", "--netns", "/proc/1/ns/net", &good])
        .stdin(Stdio::null())
        .output()
        .expect("setpriv");
    let err = text(&o.stderr);
    eprintln!("plan without CAP_SYS_ADMIN: {}", err.trim());
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(err.contains("run ctguard as root"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

// ---------------------------------------------------------------------------------------------
// `history` ordered transactions of the same second by their random suffix

#[test]
fn history_of_the_same_second_is_in_order_of_events_not_of_the_random_suffix() {
    use ctguard::journal::Journal;
    use ctguard::txn::{Kind, Reason, Requester, TargetRecord, TxnId, TxnRecord};
    common::require_root("history_of_the_same_second_is_in_order_of_events_not_of_the_random_suffix");
    let d = Dirs::new("history");
    let j = Journal::open(&d.state()).expect("journal");
    let second = 1_780_000_000;
    // Created in this order within one second; the suffixes sort the other way.
    let suffixes = [0xffff, 0x8000, 0x0001];
    let mut ids = Vec::new();
    for s in suffixes {
        let target = TargetRecord { label: "host".into(), path: "/proc/1/ns/net".into(), pin: None, dev: 0, ino: 0 };
        let requester = Requester { uid: 0, pid: 1, ssh: None, origin: None, person: None };
        let mut rec =
            TxnRecord::new(TxnId::generate(second, s), Kind::Policy, target, requester, "boot".into(), second);
        rec.to_rolled_back(Reason::ApplyFailed("test".into()), second).expect("rolled back");
        j.write(&rec).expect("write");
        ids.push(rec.id.as_str().to_string());
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    let a = ["--json", "history"];
    let o = d.cmd(&a).output().expect("history");
    let v = envelope(&a, &o);
    let listed: Vec<String> = v["data"]["transactions"]
        .as_array()
        .expect("transactions")
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(listed, ids, "history is not in the order the transactions happened");
    let o = d.cmd(&["history"]).output().expect("history");
    let shown: Vec<String> =
        text(&o.stdout).lines().filter_map(|l| l.split_whitespace().nth(1).map(str::to_string)).collect();
    assert_eq!(shown, ids, "{}", text(&o.stdout));
}

// ---------------------------------------------------------------------------------------------
// `man ctguard` lacked the policy reference, the exit codes and the safety model

#[test]
fn man_page_carries_the_policy_reference_exit_codes_and_safety_model() {
    let o = Command::new(env!("CARGO_BIN_EXE_ctguard")).arg("man").output().expect("man");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let page = text(&o.stdout);
    for section in
        [".SH POLICY", ".SH \"SAFETY MODEL\"", ".SH \"EXIT STATUS\"", ".SH \"JSON OUTPUT\"", ".SH PRIVILEGES"]
    {
        assert!(page.contains(section), "man page lacks {section}");
    }
    // Every policy key, every exit code, the transaction states.
    for key in ["backend", "persist", "notrack", "protocols", "ports", "sources", "interfaces", "local_only"] {
        assert!(page.contains(&format!("{key} = ")) || page.contains(&format!("\\fB{key}\\fR")), "policy key {key}");
    }
    for key in ["accept_untracked", "flush_existing", "sysctl", "nf_conntrack_max"] {
        assert!(page.contains(key), "policy key {key}");
    }
    for code in 0..=8 {
        assert!(page.contains(&format!(".TP\n\\fB{code}\\fR\n")), "exit code {code}");
    }
    for word in ["PENDING", "ROLLED_BACK", "dead\\-man", "NEW connection", "agent", "rolls back whatever is pending"] {
        assert!(page.contains(word), "safety model: {word}");
    }
}

// ---------------------------------------------------------------------------------------------
// Seed-era sysctl names got no "did you mean"

#[test]
fn seed_era_sysctl_names_get_did_you_mean_net_netfilter_nf_conntrack_max() {
    let d = Dirs::new("sysctl");
    for old in ["net.ipv4.netfilter.ip_conntrack_max", "net.nf_conntrack_max"] {
        let p = d.file("old.toml", &format!("[sysctl]\n\"{old}\" = 262144\n"));
        let o = Command::new(env!("CARGO_BIN_EXE_ctguard")).args(["render", &p]).output().expect("render");
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{}", show(&o));
        assert!(err.contains("did you mean \"net.netfilter.nf_conntrack_max\"?"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
