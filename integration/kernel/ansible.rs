//! The Ansible collection `ctguard.firewall` (DESIGN §8) driven by the real ansible-core over a
//! real OpenSSH server: sshd runs in `srv` (one or three namespaces), `ansible-playbook` runs in
//! `cli` with the JSON stdout callback, and the module runs the ctguard binary of this build on
//! the target with the test's own state and run dirs (hence its own agent).
//!
//! ansible-core comes from PyPI into a virtualenv made by `integration/ansible/test.sh`
//! (`target/ansible-venv`, or `CTGUARD_ANSIBLE_VENV`). The tests are `#[ignore]`d so a plain
//! `cargo test --test kernel` reports them as ignored (skipped) rather than passing without
//! Ansible; `test.sh` runs them with `--ignored` once the venv exists, and skips them (exit 77,
//! nothing reported as passed) when PyPI cannot be reached.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::sshd::{ssh, Sshd};
use crate::harness::{sa, Ns, Pair, TcpResponder, CLI4, SRV4, STATEFUL};

/// Longest one ansible-playbook run may take.
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(300);
/// Dead-man timeout of the lockout tests: short, so the tests are quick.
const LOCKOUT_TIMEOUT: &str = "8s";

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ctguard_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ctguard")
}

/// The virtualenv made by test.sh; fails the test (with what to do) when it is missing.
fn venv() -> PathBuf {
    let v = std::env::var_os("CTGUARD_ANSIBLE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/ansible-venv"));
    let playbook = v.join("bin/ansible-playbook");
    assert!(
        playbook.is_file(),
        "{} is missing: these tests need ansible-core in a virtualenv; run integration/ansible/test.sh",
        playbook.display()
    );
    v
}

/// One controller run directory: inventory, extra vars, ansible's own temp dirs; and per host
/// ctguard state and run dirs. Removed on drop.
struct Controller {
    dir: PathBuf,
}

/// A managed host: its name in the inventory and its sshd.
struct Host<'a> {
    name: String,
    sshd: &'a Sshd,
}

impl Controller {
    fn new() -> Controller {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ctg-ans-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cp")).expect("controller dir");
        Controller { dir }
    }

    fn state_dir(&self, host: &str) -> PathBuf {
        self.dir.join(host).join("state")
    }

    fn run_dir(&self, host: &str) -> PathBuf {
        self.dir.join(host).join("run")
    }

    /// Writes a YAML (JSON) inventory: every host in `group`, in order.
    fn inventory(&self, group: &str, hosts: &[Host<'_>], host_vars: &[(String, Value)]) -> PathBuf {
        let mut hv = serde_json::Map::new();
        for h in hosts {
            let args = h.sshd.ssh_args();
            // `-F /dev/null` and the `-o` options; not `-i KEY` nor `-p PORT root@ADDR`.
            let mut common: Vec<String> = args[..2].to_vec();
            common.extend(args[4..args.len() - 3].iter().cloned());
            let mut v = json!({
                "ansible_host": h.sshd.addr().ip().to_string(),
                "ansible_port": h.sshd.addr().port(),
                "ansible_user": "root",
                "ansible_ssh_private_key_file": h.sshd.client_key().display().to_string(),
                "ansible_ssh_common_args": common.join(" "),
                "ansible_python_interpreter": "/usr/bin/python3",
                "ctguard_executable": ctguard_bin(),
                "ctguard_state_dir": self.state_dir(&h.name).display().to_string(),
                "ctguard_run_dir": self.run_dir(&h.name).display().to_string(),
            });
            for (k, val) in host_vars.iter().filter(|(k, _)| k.starts_with(&format!("{}:", h.name))) {
                v[k.split_once(':').map(|x| x.1).unwrap_or(k)] = val.clone();
            }
            hv.insert(h.name.clone(), v);
        }
        let inv = json!({"all": {"children": {group: {"hosts": hv}}}});
        let path = self.dir.join("inventory.yml");
        std::fs::write(&path, serde_json::to_string_pretty(&inv).expect("json")).expect("inventory");
        path
    }

    /// Runs `ansible-playbook` in `cli` with the JSON callback; returns its exit code, the parsed
    /// JSON and the raw output (for failure messages).
    fn playbook(&self, cli: &Ns, inventory: &Path, playbook: &Path, extra_vars: Value, flags: &[&str]) -> Run {
        let venv = venv();
        let vars = self.dir.join(format!("vars-{}.json", COUNTER.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&vars, extra_vars.to_string()).expect("extra vars");
        let mut cmd = Command::new(venv.join("bin/ansible-playbook"));
        cmd.arg("-i").arg(inventory).arg("-e").arg(format!("@{}", vars.display())).args(flags).arg(playbook);
        let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", venv.join("bin").display());
        cmd.current_dir(&self.dir)
            .env_clear()
            .env("PATH", path)
            .env("HOME", &self.dir)
            .env("LC_ALL", "C.UTF-8")
            .env("ANSIBLE_COLLECTIONS_PATH", repo().join("integration/ansible/collections"))
            .env("ANSIBLE_CALLBACK_PLUGINS", repo().join("integration/ansible/tests/callback_plugins"))
            .env("ANSIBLE_STDOUT_CALLBACK", "ctguard_json")
            .env("ANSIBLE_LOAD_CALLBACK_PLUGINS", "1")
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_HOME", self.dir.join("ansible-home"))
            .env("ANSIBLE_LOCAL_TEMP", self.dir.join("ansible-local"))
            .env("ANSIBLE_REMOTE_TMP", self.dir.join("ansible-remote"))
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", self.dir.join("cp"))
            .env("ANSIBLE_TIMEOUT", "5")
            .env("ANSIBLE_SSH_RETRIES", "0")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
            .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // root -> root: without this Ansible skips `become` altogether.
            .env("ANSIBLE_BECOME_ALLOW_SAME_USER", "True")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let out = cli.run(move || -> std::io::Result<std::process::Output> {
            let child = cmd.spawn()?;
            let pid = child.id() as i32;
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(child.wait_with_output());
            });
            match rx.recv_timeout(PLAYBOOK_TIMEOUT) {
                Ok(r) => r,
                Err(_) => {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    Err(std::io::Error::other(format!("ansible-playbook timed out after {PLAYBOOK_TIMEOUT:?}")))
                }
            }
        });
        let out = match out {
            Ok(o) => o,
            Err(e) => panic!("ansible-playbook {}: {e}", playbook.display()),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // The JSON callback prints one document; warnings may precede it on stdout.
        let json =
            stdout.find("{\n").and_then(|i| serde_json::from_str::<Value>(&stdout[i..]).ok()).unwrap_or_else(|| {
                panic!(
                    "ansible-playbook printed no JSON (exit {:?}):\n{stdout}\n--- stderr ---\n{stderr}",
                    out.status.code()
                )
            });
        let r = Run { code: out.status.code().unwrap_or(-1), json, stdout, stderr, elapsed: started.elapsed() };
        eprintln!(
            "ansible: {} {} -> exit {} in {:.1} s",
            playbook.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            flags.join(" "),
            r.code,
            r.elapsed.as_secs_f64()
        );
        r
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Run {
    code: i32,
    json: Value,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    /// The result of task `name` on `host` (Null when it did not run there).
    fn task(&self, name: &str, host: &str) -> Value {
        for play in self.json["plays"].as_array().into_iter().flatten() {
            for t in play["tasks"].as_array().into_iter().flatten() {
                if t["task"]["name"] == name {
                    if let Some(r) = t["hosts"].get(host) {
                        return r.clone();
                    }
                }
            }
        }
        Value::Null
    }

    fn stats(&self, host: &str) -> Value {
        self.json["stats"].get(host).cloned().unwrap_or(Value::Null)
    }

    fn dump(&self) -> String {
        format!("exit {}\n{}\n--- stderr ---\n{}", self.code, self.stdout, self.stderr)
    }
}

fn playbook(name: &str) -> PathBuf {
    repo().join("integration/ansible/playbooks").join(name)
}

fn test_playbook(name: &str) -> PathBuf {
    repo().join("integration/ansible/tests").join(name)
}

/// `ctguard --json … show TXID` with a host's state dir, from the test process.
fn show(c: &Controller, host: &str, txid: &str) -> Value {
    let out = Command::new(ctguard_bin())
        .arg("--json")
        .arg("--state-dir")
        .arg(c.state_dir(host))
        .arg("--run-dir")
        .arg(c.run_dir(host))
        .args(["show", txid])
        .output()
        .expect("ctguard show");
    serde_json::from_slice::<Value>(&out.stdout)
        .map(|mut v| v["data"].take())
        .unwrap_or_else(|e| panic!("show {txid}: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn history_len(c: &Controller, host: &str) -> usize {
    if !c.state_dir(host).exists() {
        return 0;
    }
    let out = Command::new(ctguard_bin())
        .arg("--json")
        .arg("--state-dir")
        .arg(c.state_dir(host))
        .arg("--run-dir")
        .arg(c.run_dir(host))
        .arg("history")
        .output()
        .expect("ctguard history");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["data"]["transactions"].as_array().map(Vec::len).unwrap_or(0)
}

/// A ruleset that drops every incoming packet (established SSH included).
const LOCKOUT: &str = "flush ruleset\ntable inet lockout {\n  chain input {\n    type filter hook input priority filter; policy drop;\n  }\n}\n";

fn host<'a>(name: &str, sshd: &'a Sshd) -> Host<'a> {
    Host { name: name.to_string(), sshd }
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// A `srv`/`cli` pair, `srv` behind the usual stateful firewall and running sshd on port 22.
fn stateful_target(label: &str) -> (Pair, Sshd) {
    let pair = Pair::new(label);
    pair.srv.nft(STATEFUL);
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    (pair, sshd)
}

#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_check_diff_commit_and_idempotence() {
    let (pair, sshd) = stateful_target("ans-commit");
    let c = Controller::new();
    let hosts = [host("srv", &sshd)];
    let inv = c.inventory("dns", &hosts, &[]);
    let pb = playbook("dns_notrack_committed.yml");
    let task = "Apply NOTRACK for DNS and confirm it over a new connection";
    let before = pair.srv.nft_list();

    // Check mode: changed predicted, nothing changed.
    let r = c.playbook(&pair.cli, &inv, &pb, json!({}), &["--check"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    let t = r.task(task, "srv");
    assert_eq!(t["changed"], true, "{}", r.dump());
    assert!(t["txid"].is_null(), "{t}");
    assert_eq!(pair.srv.nft_list(), before, "check mode changed srv");
    assert_eq!(history_len(&c, "srv"), 0, "check mode started a transaction");

    // Diff mode (with check): the rules before and after.
    let r = c.playbook(&pair.cli, &inv, &pb, json!({}), &["--check", "--diff"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    let t = r.task(task, "srv");
    let diff = &t["diff"];
    let diff = if diff.is_array() { diff[0].clone() } else { diff.clone() };
    let after = s(&diff["after"]);
    assert!(after.contains("notrack") && after.contains("53"), "diff after: {after}\n{}", r.dump());
    assert!(after.contains("accept insertions"), "diff after lacks the accept insertion: {after}");
    assert!(!s(&diff["before"]).contains("notrack"), "{diff}");
    assert_eq!(pair.srv.nft_list(), before);

    // Committed, confirmed over a new connection.
    let r = c.playbook(&pair.cli, &inv, &pb, json!({"ctguard_timeout": "60s"}), &[]);
    assert_eq!(r.code, 0, "{}", r.dump());
    let t = r.task(task, "srv");
    assert_eq!(t["changed"], true, "{}", r.dump());
    assert_eq!(t["outcome"], "committed", "{t}");
    let txid = s(&t["txid"]);
    assert!(!txid.is_empty(), "{t}");
    let sh = show(&c, "srv", &txid);
    assert_eq!(sh["state"], "COMMITTED", "{sh}");
    let now = pair.srv.nft_list();
    assert!(now.contains("table inet ctguard"), "{now}");
    assert!(now.contains("notrack"), "{now}");
    assert!(now.contains(&format!("ctguard:{txid}")), "the accept insertion is not tagged: {now}");
    eprintln!("ansible: committed {txid}; events: {}", sh["events"]);

    // Again: nothing to change.
    let r = c.playbook(&pair.cli, &inv, &pb, json!({}), &[]);
    assert_eq!(r.code, 0, "{}", r.dump());
    let t = r.task(task, "srv");
    assert_eq!(t["changed"], false, "{}", r.dump());
    assert_eq!(t["outcome"], "unchanged", "{t}");
    assert_eq!(pair.srv.nft_list(), now);
    assert_eq!(history_len(&c, "srv"), 1, "the idempotent run started a transaction");
}

#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_ruleset_rollout_idempotence_and_lockout_rollback() {
    let (pair, sshd) = stateful_target("ans-lockout");
    let c = Controller::new();
    let dest = c.dir.join("srv-candidate.nft");
    let inv = c.inventory("targets", &[host("srv", &sshd)], &[]);
    let task = "Apply it and confirm from a new connection";

    // A ruleset that changes something: committed, with its diff; then again: a no-op.
    let good = c.dir.join("good.nft");
    let good_text = STATEFUL.replace(
        "    tcp dport 22 ct state new accept\n",
        "    tcp dport 22 ct state new accept\n    tcp dport 8080 ct state new accept\n",
    );
    assert_ne!(good_text, STATEFUL);
    std::fs::write(&good, format!("flush ruleset\n{good_text}")).expect("ruleset");
    let vars = json!({"ruleset_src": good, "ruleset_dest": dest, "ctguard_timeout": "60s"});
    let r = c.playbook(&pair.cli, &inv, &playbook("ruleset_rollout.yml"), vars.clone(), &["--diff"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    let t = r.task(task, "srv");
    assert_eq!(t["changed"], true, "{t}");
    assert_eq!(t["outcome"], "committed", "{t}");
    assert_eq!(t["noop"], false, "{t}");
    let diff = if t["diff"].is_array() { t["diff"][0].clone() } else { t["diff"].clone() };
    assert!(s(&diff["after"]).contains("8080"), "diff: {diff}");
    assert_eq!(show(&c, "srv", &s(&t["txid"]))["state"], "COMMITTED");
    assert!(pair.srv.nft_list().contains("dport 8080"), "{}", pair.srv.nft_list());
    let r = c.playbook(&pair.cli, &inv, &playbook("ruleset_rollout.yml"), vars, &[]);
    assert_eq!(r.code, 0, "{}", r.dump());
    let t = r.task(task, "srv");
    assert_eq!(t["changed"], false, "{t}");
    assert_eq!(t["noop"], true, "{t}");
    assert_eq!(t["outcome"], "committed", "{t}");

    // A ruleset that drops every incoming packet (force: the lint would refuse it).
    let src = c.dir.join("lockout.nft");
    std::fs::write(&src, LOCKOUT).expect("ruleset");
    let before = pair.srv.nft_list();
    let r = c.playbook(
        &pair.cli,
        &inv,
        &playbook("ruleset_rollout.yml"),
        json!({"ruleset_src": src, "ruleset_dest": dest, "ctguard_force": true, "ctguard_timeout": LOCKOUT_TIMEOUT}),
        &[],
    );
    assert_ne!(r.code, 0, "{}", r.dump());
    let t = r.task(task, "srv");
    assert_eq!(t["failed"], true, "{}", r.dump());
    let msg = s(&t["msg"]);
    assert!(msg.contains("rolled back"), "{msg}\n{}", r.dump());
    eprintln!("ansible: lockout task failed with: {msg}");
    // Reachable again, and the ruleset as before.
    let o = ssh(&pair.cli, &sshd, &["true"], false);
    assert!(o.success(), "srv is not reachable after the rollback: {}", o.stderr);
    assert_eq!(pair.srv.nft_list(), before, "the ruleset differs after the rollback");
    let txid = s(&t["txid"]);
    if !txid.is_empty() {
        let sh = show(&c, "srv", &txid);
        assert_eq!(sh["state"], "ROLLED_BACK", "{sh}");
    }
}

/// Drops every packet in and out: not even the apply's reply gets back to the controller.
const LOCKOUT_BOTH_WAYS: &str = "flush ruleset\ntable inet lockout {\n  chain input {\n    type filter hook input priority filter; policy drop;\n  }\n  chain output {\n    type filter hook output priority filter; policy drop;\n  }\n}\n";

#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_lockout_that_loses_the_apply_reply_is_rolled_back() {
    let (pair, sshd) = stateful_target("ans-lost");
    let c = Controller::new();
    let src = c.dir.join("lockout.nft");
    std::fs::write(&src, LOCKOUT_BOTH_WAYS).expect("ruleset");
    let dest = c.dir.join("srv-candidate.nft");
    let inv = c.inventory("targets", &[host("srv", &sshd)], &[]);
    let before = pair.srv.nft_list();
    // With force: applied, the reply is lost, nothing confirms, the agent rolls back.
    let r = c.playbook(
        &pair.cli,
        &inv,
        &playbook("ruleset_rollout.yml"),
        json!({"ruleset_src": src, "ruleset_dest": dest, "ctguard_force": true, "ctguard_timeout": LOCKOUT_TIMEOUT}),
        &[],
    );
    assert_ne!(r.code, 0, "{}", r.dump());
    let t = r.task("Apply it and confirm from a new connection", "srv");
    assert_eq!(t["failed"], true, "{}", r.dump());
    let msg = s(&t["msg"]);
    assert!(msg.contains("rolled back"), "{msg}\n{}", r.dump());
    eprintln!("ansible: lost-reply lockout failed with: {msg}");
    let o = ssh(&pair.cli, &sshd, &["true"], false);
    assert!(o.success(), "srv is not reachable after the rollback: {}", o.stderr);
    assert_eq!(pair.srv.nft_list(), before, "the ruleset differs after the rollback");
    assert_eq!(history_len(&c, "srv"), 1);
}

/// Regression (bug: "ruleset transactions had no ssh-lockout lint"): DESIGN §1/§7 say the lint
/// refuses, for both kinds of transaction, a result that blocks the requester's own SSH
/// connection unless `--force`. A ruleset that drops every packet was applied without `force`
/// and only the dead-man timer saved the host; now it is refused up front (exit 3).
#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn regression_ruleset_lockout_without_force_is_refused_by_the_lint() {
    let (pair, sshd) = stateful_target("ans-nolint");
    let c = Controller::new();
    let src = c.dir.join("lockout.nft");
    std::fs::write(&src, LOCKOUT).expect("ruleset");
    let dest = c.dir.join("srv-candidate.nft");
    let inv = c.inventory("targets", &[host("srv", &sshd)], &[]);
    let before = pair.srv.nft_list();
    let r = c.playbook(
        &pair.cli,
        &inv,
        &playbook("ruleset_rollout.yml"),
        json!({"ruleset_src": src, "ruleset_dest": dest, "ctguard_timeout": LOCKOUT_TIMEOUT}),
        &[],
    );
    let t = r.task("Apply it and confirm from a new connection", "srv");
    eprintln!("ansible: lockout ruleset without force -> {t}");
    assert_eq!(pair.srv.nft_list(), before);
    assert_eq!(t["failed"], true, "{}", r.dump());
    assert_eq!(t["rc"], 3, "the lint did not refuse a ruleset that drops the SSH connection: {t}");
    assert!(s(&t["msg"]).contains("force"), "{t}");
    assert_eq!(history_len(&c, "srv"), 0);
}

/// `cli` with one veth per server namespace: srvN is 198.18.N.1, cli 198.18.N.2 on `vethN`.
struct Fleet {
    cli: Ns,
    srvs: Vec<Ns>,
}

impl Fleet {
    fn new(n: usize) -> Fleet {
        let cli = Ns::new("ans-fleet-cli");
        let mut srvs = Vec::new();
        for i in 1..=n {
            let srv = Ns::new(&format!("ans-fleet-srv{i}"));
            let ifc = format!("veth{i}");
            srv.exec("ip", &["link", "add", "veth0", "type", "veth", "peer", "name", &ifc, "netns", cli.name()]);
            srv.exec("ip", &["addr", "add", &format!("198.18.{i}.1/24"), "dev", "veth0"]);
            srv.exec("ip", &["link", "set", "veth0", "up"]);
            cli.exec("ip", &["addr", "add", &format!("198.18.{i}.2/24"), "dev", &ifc]);
            cli.exec("ip", &["link", "set", &ifc, "up"]);
            srvs.push(srv);
        }
        // Wait until every link is up on both ends.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (i, srv) in srvs.iter().enumerate() {
            let ifc = format!("veth{}", i + 1);
            for (ns, dev) in [(srv, "veth0"), (&cli, ifc.as_str())] {
                loop {
                    let link = ns.exec("ip", &["-o", "link", "show", "dev", dev]);
                    if link.contains("LOWER_UP") && link.contains("state UP") {
                        break;
                    }
                    assert!(Instant::now() < deadline, "fleet link {dev} in {} did not come up: {link}", ns.name());
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        Fleet { cli, srvs }
    }
}

#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_fleet_canary_stops_at_the_locked_out_canary() {
    let fleet = Fleet::new(3);
    let sshds: Vec<Sshd> = fleet
        .srvs
        .iter()
        .enumerate()
        .map(|(i, ns)| Sshd::start(ns, format!("198.18.{}.1", i + 1).parse().expect("ip"), 22))
        .collect();
    for ns in &fleet.srvs {
        ns.nft(STATEFUL);
    }
    let c = Controller::new();
    let bad = c.dir.join("lockout.nft");
    std::fs::write(&bad, LOCKOUT).expect("ruleset");
    let good = c.dir.join("good.nft");
    std::fs::write(&good, format!("flush ruleset\n{STATEFUL}")).expect("ruleset");
    let hosts: Vec<Host<'_>> = (0..3).map(|i| host(&format!("srv{}", i + 1), &sshds[i])).collect();
    // Host variables (extra vars would override them): the canary gets the lockout.
    let mut hv = vec![("srv1:ruleset_src".to_string(), json!(bad))];
    for h in &hosts[1..] {
        hv.push((format!("{}:ruleset_src", h.name), json!(good)));
    }
    for h in &hosts {
        let dest = c.dir.join(format!("{}-candidate.nft", h.name));
        hv.push((format!("{}:ruleset_dest", h.name), json!(dest)));
    }
    let inv = c.inventory("fleet", &hosts, &hv);
    let before: Vec<String> = fleet.srvs.iter().map(Ns::nft_list).collect();
    let r = c.playbook(
        &fleet.cli,
        &inv,
        &playbook("fleet_canary.yml"),
        json!({"ctguard_force": true, "ctguard_timeout": LOCKOUT_TIMEOUT}),
        &[],
    );
    assert_ne!(r.code, 0, "{}", r.dump());
    let t = r.task("Apply it and confirm from a new connection", "srv1");
    assert_eq!(t["failed"], true, "{}", r.dump());
    assert!(s(&t["msg"]).contains("rolled back"), "{}", r.dump());
    for h in ["srv2", "srv3"] {
        assert!(r.stats(h).is_null(), "{h} was touched: {}\n{}", r.stats(h), r.dump());
        assert!(r.task("Copy the candidate ruleset", h).is_null(), "{h} got the ruleset");
        assert_eq!(history_len(&c, h), 0, "{h} ran a transaction");
    }
    let after: Vec<String> = fleet.srvs.iter().map(Ns::nft_list).collect();
    assert_eq!(after, before, "a ruleset changed");
    for (i, sshd) in sshds.iter().enumerate() {
        let o = ssh(&fleet.cli, sshd, &["true"], false);
        assert!(o.success(), "srv{} unreachable: {}", i + 1, o.stderr);
    }
}

#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_two_task_pattern_then_rolled_back() {
    let (pair, sshd) = stateful_target("ans-twotask");
    let c = Controller::new();
    let inv = c.inventory("dns", &[host("srv", &sshd)], &[]);
    let r = c.playbook(&pair.cli, &inv, &playbook("two_task_pending_confirm.yml"), json!({}), &[]);
    assert_eq!(r.code, 0, "{}", r.dump());
    let p = r.task("Apply and leave the transaction pending", "srv");
    assert_eq!(p["changed"], true, "{p}");
    assert_eq!(p["outcome"], "pending", "{p}");
    assert_eq!(p["needs_new_connection"], true, "the agent did not see an SSH origin: {p}");
    assert!(!s(&p["deadline"]).is_empty(), "{p}");
    let txid = s(&p["txid"]);
    let cf = r.task("Confirm over the new connection", "srv");
    assert_eq!(cf["changed"], true, "{}", r.dump());
    assert_eq!(cf["outcome"], "committed", "{cf}");
    assert_eq!(show(&c, "srv", &txid)["state"], "COMMITTED");
    let committed = pair.srv.nft_list();
    assert!(committed.contains("table inet ctguard"), "{committed}");

    // state: rolled_back of a second, pending transaction restores the committed state.
    let policy = json!({"notrack": [{"protocols": ["udp"], "ports": [5353]}]});
    let r = c.playbook(
        &pair.cli,
        &inv,
        &test_playbook("pending_then_rolled_back.yml"),
        json!({"ctguard_policy": policy}),
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.dump());
    let p = r.task("Apply and leave pending", "srv");
    let txid2 = s(&p["txid"]);
    assert!(!txid2.is_empty(), "{p}");
    let rb = r.task("Roll it back now", "srv");
    assert_eq!(rb["changed"], true, "{rb}");
    assert!(s(&rb["outcome"]).starts_with("rolled back"), "{rb}");
    assert_eq!(show(&c, "srv", &txid2)["state"], "ROLLED_BACK");
    assert_eq!(pair.srv.nft_list(), committed, "the rollback did not restore the committed state");
}

/// A confirm over the connection that applied (the ControlPersist master, no reset) is refused
/// with exit 8 and a message saying why; nothing is committed.
#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_confirm_over_the_same_connection_is_refused() {
    let (pair, sshd) = stateful_target("ans-same");
    let c = Controller::new();
    let inv = c.inventory("dns", &[host("srv", &sshd)], &[]);
    let before = pair.srv.nft_list();
    let policy = json!({"notrack": [{"protocols": ["udp"], "ports": [53]}]});
    let r = c.playbook(
        &pair.cli,
        &inv,
        &test_playbook("same_connection_confirm.yml"),
        json!({"ctguard_policy": policy}),
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.dump());
    let txid = s(&r.task("Apply and leave pending", "srv")["txid"]);
    let cf = r.task("Confirm without a new connection", "srv");
    assert_eq!(cf["failed"], true, "the same connection confirmed: {}", r.dump());
    assert_eq!(cf["rc"], 8, "{cf}");
    assert!(s(&cf["msg"]).contains("NEW connection"), "{cf}");
    eprintln!("ansible: same-connection confirm -> {}", s(&cf["msg"]));
    let rb = r.task("Roll it back now", "srv");
    assert_eq!(rb["changed"], true, "{rb}");
    assert_eq!(show(&c, "srv", &txid)["state"], "ROLLED_BACK");
    assert_eq!(pair.srv.nft_list(), before);
}

/// `probes` + `auto_confirm`: committed by the agent after the first probe round.
#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_probes_and_auto_confirm() {
    let (pair, sshd) = stateful_target("ans-probe");
    let responder = TcpResponder::start(&pair.cli, sa(CLI4, 8053));
    let c = Controller::new();
    let inv = c.inventory("dns", &[host("srv", &sshd)], &[]);
    let policy = json!({"notrack": [{"protocols": ["udp"], "ports": [53]}]});
    let probes = json!([format!("tcp:{CLI4}:8053")]);
    let r = c.playbook(
        &pair.cli,
        &inv,
        &test_playbook("probes_auto_confirm.yml"),
        json!({"ctguard_policy": policy, "ctguard_probes": probes, "ctguard_comment": "CHG-1234 DNS notrack"}),
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.dump());
    let t = r.task("Apply, probe, auto-confirm", "srv");
    assert_eq!(t["changed"], true, "{t}");
    assert_eq!(t["outcome"], "committed", "{t}");
    let shown = show(&c, "srv", &s(&t["txid"]));
    assert_eq!(shown["state"], "COMMITTED");
    assert_eq!(shown["comment"], "CHG-1234 DNS notrack", "the module's comment is recorded: {shown}");
    assert!(responder.wait_accepted(1, std::time::Duration::from_secs(1)) >= 1, "the probe never connected");

    // A probe that fails: rolled back by the agent, the task fails saying so.
    let policy = json!({"notrack": [{"protocols": ["udp"], "ports": [5353]}]});
    let before = pair.srv.nft_list();
    let probes = json!([format!("tcp:{CLI4}:8054")]);
    let r = c.playbook(
        &pair.cli,
        &inv,
        &test_playbook("probes_auto_confirm.yml"),
        json!({"ctguard_policy": policy, "ctguard_probes": probes}),
        &[],
    );
    assert_ne!(r.code, 0, "{}", r.dump());
    let t = r.task("Apply, probe, auto-confirm", "srv");
    assert_eq!(t["rc"], 5, "{t}");
    assert!(s(&t["msg"]).contains("rolled back"), "{t}");
    assert_eq!(pair.srv.nft_list(), before);
}

/// With `become` (sudo resets the environment: no `SSH_CONNECTION`), the proof follows the sshd
/// ancestry: the two-task pattern still confirms, and the confirmation is recorded as an SSH one.
#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_two_task_pattern_with_become() {
    let (pair, sshd) = stateful_target("ans-become");
    let c = Controller::new();
    let inv = c.inventory("dns", &[host("srv", &sshd)], &[]);
    // What `become` does to the environment here (the premise of this test).
    let r = c.playbook(
        &pair.cli,
        &inv,
        &test_playbook("become_env.yml"),
        json!({"ansible_become_method": "sudo"}),
        &["--become"],
    );
    assert_eq!(r.code, 0, "{}", r.dump());
    let env = s(&r.task("Environment", "srv")["stdout"]);
    let stripped = !env.lines().any(|l| l.starts_with("SSH_CONNECTION="));
    eprintln!("ansible: under become (sudo) SSH_CONNECTION is {}", if stripped { "stripped" } else { "kept" });
    let r = c.playbook(
        &pair.cli,
        &inv,
        &playbook("two_task_pending_confirm.yml"),
        json!({"ansible_become_method": "sudo"}),
        &["--become"],
    );
    assert_eq!(r.code, 0, "{}", r.dump());
    let p = r.task("Apply and leave the transaction pending", "srv");
    assert_eq!(p["needs_new_connection"], true, "the agent did not see an SSH origin under become: {p}");
    let txid = s(&p["txid"]);
    let cf = r.task("Confirm over the new connection", "srv");
    assert_eq!(cf["outcome"], "committed", "{}", r.dump());
    let sh = show(&c, "srv", &txid);
    eprintln!("ansible: become: requester {} events {}", sh["requester"], sh["events"]);
    assert_eq!(sh["state"], "COMMITTED", "{sh}");
    assert_eq!(sh["requester"]["origin"]["via"], "ancestry", "{sh}");
    // (requester.ssh is the connection the agent found, not the environment variable.)
    assert!(stripped, "sudo kept SSH_CONNECTION here: this test did not exercise the ancestry-only path");
    let notes: Vec<String> = sh["events"].as_array().into_iter().flatten().map(|e| s(&e["note"])).collect();
    assert!(
        notes.iter().any(|n| n.starts_with("confirmed from ssh") && n.contains("via Ancestry")),
        "the confirm was not proven through the sshd ancestry: {notes:?}"
    );
}

#[test]
#[ignore = "needs ansible-core: run integration/ansible/test.sh"]
fn ansible_bad_parameters_name_the_field_and_change_nothing() {
    let (pair, sshd) = stateful_target("ans-badparam");
    let c = Controller::new();
    let inv = c.inventory("dns", &[host("srv", &sshd)], &[]);
    let before = pair.srv.nft_list();
    let task = "Apply NOTRACK for DNS and confirm it over a new connection";

    // A misspelt module option.
    let r = c.playbook(&pair.cli, &inv, &test_playbook("unknown_parameter.yml"), json!({}), &[]);
    assert_ne!(r.code, 0, "{}", r.dump());
    let t = r.task("Misspelt option", "srv");
    assert_eq!(t["failed"], true, "{}", r.dump());
    assert!(s(&t["msg"]).contains("timout"), "{t}");

    // An unknown key in the policy.
    let bad_key = json!({"notrack": [{"protocols": ["udp"], "ports": [53], "portz": [54]}]});
    let r =
        c.playbook(&pair.cli, &inv, &playbook("dns_notrack_committed.yml"), json!({"ctguard_policy": bad_key}), &[]);
    let t = r.task(task, "srv");
    assert_eq!(t["failed"], true, "{}", r.dump());
    assert!(s(&t["msg"]).contains("portz"), "{t}");
    eprintln!("ansible: unknown key -> {}", s(&t["msg"]));

    // A port out of range.
    let bad_port = json!({"notrack": [{"protocols": ["udp"], "ports": [70000]}]});
    let r =
        c.playbook(&pair.cli, &inv, &playbook("dns_notrack_committed.yml"), json!({"ctguard_policy": bad_port}), &[]);
    let t = r.task(task, "srv");
    assert_eq!(t["failed"], true, "{}", r.dump());
    let msg = s(&t["msg"]);
    assert!(msg.contains("ports") || msg.contains("70000"), "{t}");
    eprintln!("ansible: bad port -> {msg}");

    // A bad module value (choices).
    let r = c.playbook(
        &pair.cli,
        &inv,
        &test_playbook("pending_then_rolled_back.yml"),
        json!({"ctguard_policy": "not a dict"}),
        &[],
    );
    let t = r.task("Apply and leave pending", "srv");
    assert_eq!(t["failed"], true, "{}", r.dump());
    assert!(s(&t["msg"]).contains("policy"), "{t}");

    assert_eq!(pair.srv.nft_list(), before, "a bad parameter changed srv");
    assert_eq!(history_len(&c, "srv"), 0, "a bad parameter started a transaction");
}
