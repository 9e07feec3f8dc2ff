//! Issue 14: directories, files and sockets that another user could plant. Each is refused
//! (exit 2 or 6), and the canary it aimed at is untouched.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::txn_cli::{ok, Ctg};
use crate::harness::{Ns, STATEFUL};

const NOBODY: u32 = 65534;

fn run(state: &Path, run: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .arg("--state-dir")
        .arg(state)
        .arg("--run-dir")
        .arg(run)
        .args(args)
        .env_remove("SSH_CONNECTION")
        .output()
        .expect("ctguard")
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch base dir (root, 0755) removed on drop.
struct Base(PathBuf);

impl Base {
    fn new(name: &str) -> Base {
        let p = std::env::temp_dir().join(format!("ctguard-trust-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Base(p)
    }
    fn dir(&self, name: &str, mode: u32, uid: u32) -> PathBuf {
        let d = self.0.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).expect("chmod");
        nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(uid)), None).expect("chown");
        d
    }
    /// A root-owned 0600 file whose content must not change.
    fn canary(&self) -> PathBuf {
        let c = self.0.join("canary");
        std::fs::write(&c, "untouched\n").expect("canary");
        std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        c
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_canary(c: &Path) {
    assert_eq!(std::fs::read_to_string(c).expect("canary"), "untouched\n", "the canary was changed");
    let m = std::fs::metadata(c).expect("canary");
    assert_eq!(m.mode() & 0o777, 0o600, "the canary's mode was changed");
}

#[test]
fn a_state_dir_another_user_owns_or_can_write_is_refused() {
    let b = Base::new("state");
    let ns = Ns::new("trust-state");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let canary = b.canary();
    let run_dir = b.dir("run", 0o700, 0);
    for (name, mode, uid) in [("theirs", 0o700, NOBODY), ("open", 0o777, 0), ("group", 0o770, 0)] {
        let state = b.dir(name, mode, uid);
        // A planted probe-file symlink aimed at the canary, for every pid this test could see.
        for pid in [std::process::id() + 1, std::process::id() + 2] {
            let _ = std::os::unix::fs::symlink(&canary, state.join(format!(".probe-{pid}")));
        }
        for verb in [&["status"][..], &["history"], &["apply", "--netns", ns.name(), "--timeout", "5s"]] {
            let o = run(&state, &run_dir, verb);
            assert_eq!(o.status.code(), Some(2), "{name} {verb:?}: {}", err(&o));
            assert!(err(&o).contains(&state.display().to_string()), "{name}: the error names the dir: {}", err(&o));
        }
        assert_canary(&canary);
    }
    // Nothing started an agent, nothing changed.
    assert!(!run_dir.join("ctguard.sock").exists());
    assert_eq!(ns.nft_list(), before);
}

#[test]
fn a_symlinked_run_dir_is_refused_and_its_target_keeps_its_mode() {
    let b = Base::new("runlink");
    let state = b.dir("state", 0o700, 0);
    let target = b.dir("elsewhere", 0o755, 0);
    let link = b.0.join("run");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let o = run(&state, &link, &["rollback"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("symbolic link"), "{}", err(&o));
    assert_eq!(std::fs::metadata(&target).expect("target").mode() & 0o777, 0o755, "the link's target was chmodded");
    assert!(std::fs::read_dir(&target).expect("target").next().is_none(), "something was created through the link");
    // A symlinked agent.log in a trusted run dir is not followed either.
    let canary = b.canary();
    let run_dir = b.dir("run2", 0o700, 0);
    std::os::unix::fs::symlink(&canary, run_dir.join("agent.log")).expect("symlink");
    let o = run(&state, &run_dir, &["rollback"]);
    assert_ne!(o.status.code(), Some(0), "{}", err(&o));
    assert_canary(&canary);
}

#[test]
fn a_socket_served_by_another_uid_gets_nothing() {
    let b = Base::new("sock");
    let state = b.dir("state", 0o700, 0);
    let run_dir = b.dir("run", 0o700, 0);
    let sock = run_dir.join("ctguard.sock");
    let got = b.0.join("received");
    // Bound as root, listening as nobody (SO_PEERCRED reports the listener's credentials): it
    // answers "ok" to anything and records what it received.
    let script = format!(
        "import os,socket\ns=socket.socket(socket.AF_UNIX)\ns.bind({sock:?})\nos.setgid({NOBODY})\nos.setuid({NOBODY})\ns.listen(8)\nn=0\nwhile True:\n  c,_=s.accept()\n  c.settimeout(1)\n  try:\n    d=c.recv(65536)\n    n+=len(d)\n    c.sendall(b'{{\"v\":1,\"exit\":0,\"data\":{{\"pid\":1}}}}\\n')\n  except Exception:\n    pass\n  c.close()\n  print(n, flush=True)\n",
        sock = sock.display().to_string()
    );
    let recv = std::fs::File::create(&got).expect("file");
    nix::unistd::chown(&got, Some(nix::unistd::Uid::from_raw(NOBODY)), None).expect("chown");
    let mut server = Command::new("python3").args(["-c", &script]).stdout(recv).spawn().expect("python3");
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(5), "the fake agent did not bind");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    for verb in [&["rollback"][..], &["confirm"], &["extend", "--by", "10s"]] {
        let o = run(&state, &run_dir, verb);
        assert_eq!(o.status.code(), Some(6), "{verb:?}: {}", err(&o));
        assert!(err(&o).contains("not root"), "{}", err(&o));
    }
    let _ = server.kill();
    let _ = server.wait();
    let received = std::fs::read_to_string(&got).unwrap_or_default();
    assert!(received.lines().all(|l| l.trim() == "0"), "the fake agent received a request: {received:?}");
}

#[test]
fn a_record_another_uid_wrote_is_never_acted_on() {
    let ns = Ns::new("trust-rec");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let file = ctg.base.join("open.nft");
    std::fs::create_dir_all(&ctg.base).expect("base");
    std::fs::write(&file, format!("flush ruleset\n{STATEFUL}table inet planted {{\n}}\n")).expect("write");
    let (out, id) = ctg.apply(&ns, &["--timeout", "2s", "--ruleset", file.to_str().expect("utf8")]);
    ok(&out);
    let applied = ns.nft_list();
    // The agent dies; its PENDING record is now owned by nobody (as if another user wrote it).
    let pid = ctg.signal_agent(nix::sys::signal::Signal::SIGKILL);
    assert!(super::txn_cli::wait_gone(pid, Duration::from_secs(5)));
    let rec = ctg.base.join("state").join("txn").join(format!("{id}.json"));
    nix::unistd::chown(&rec, Some(nix::unistd::Uid::from_raw(NOBODY)), None).expect("chown");
    let before_bytes = std::fs::read(&rec).expect("record");
    // A new agent starts (any verb), the deadline passes: the record is reported, not used.
    let st = ctg.json(&["status"]);
    assert!(st["pending"].as_array().is_none_or(Vec::is_empty), "{st}");
    assert!(st["damaged"].to_string().contains("not written by root alone"), "{st}");
    let _ = ctg.run(&["rollback"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ns.nft_list(), applied, "an untrusted record was acted on");
    assert_eq!(std::fs::read(&rec).expect("record"), before_bytes, "the untrusted record was rewritten");
    // Tidy: give it back to root so the test's cleanup rolls it back.
    nix::unistd::chown(&rec, Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");
    let pid = ctg.signal_agent(nix::sys::signal::Signal::SIGKILL);
    assert!(super::txn_cli::wait_gone(pid, Duration::from_secs(5)));
}
