//! Inputs through the real binary (issues 11, 14, 15): a POLICY or `--ruleset` argument is
//! read exactly once, from a file, a pipe (`/dev/fd/N`, as `<(…)` gives) or stdin (`-`), and
//! anything else (a directory, a device, a socket) is exit 2 naming the path; `--netns` that
//! is not a network namespace is exit 2 within a second with nothing created and no agent
//! asked; every error is one escaped `ctguard: error:` line, at most 20 of them; clap's
//! argument errors are one line too. Nothing here touches netfilter: `render` is pure, and the
//! `--netns`, `--ruleset` and policy refusals happen before any namespace is entered.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ctguard");

const POLICY: &str = "[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [5353, \"6000-6010\"]\n";

/// A directory of its own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ctguard-cli-inputs-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).expect("write file");
        p
    }
    /// A fresh, empty directory inside (a run or state dir).
    fn dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn base_cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env("LC_ALL", "C").env_remove("RUST_LOG").env_remove("SSH_CONNECTION").env_remove("JOURNAL_STREAM");
    c
}

fn ctguard(args: &[&str]) -> Output {
    base_cmd().args(args).stdin(Stdio::null()).output().expect("run ctguard")
}

/// Runs ctguard with `input` on its stdin.
fn ctguard_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = base_cmd()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ctguard");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait ctguard");
    writer.join().expect("writer");
    out
}

#[path = "support/pipe.rs"]
mod pipe;
use pipe::PIPE_FD;

/// Runs ctguard with a pipe holding `input` on fd [`PIPE_FD`] (no shell): `args` may name it
/// as `/dev/fd/9`.
fn ctguard_pipe_fd(args: &[&str], input: &[u8]) -> Output {
    let mut cmd = base_cmd();
    cmd.args(args).stdin(Stdio::null());
    pipe::run_with_pipe(cmd, input)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!("exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), text(&o.stdout), text(&o.stderr))
}

fn assert_ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", show(o));
}

/// Exit 2, nothing on stdout, exactly one `ctguard: error:` line on stderr containing every
/// one of `parts`; returns that line.
fn assert_one_error_line(o: &Output, parts: &[&str]) -> String {
    assert_eq!(o.status.code(), Some(2), "{}", show(o));
    assert!(o.stdout.is_empty(), "{}", show(o));
    let stderr = text(&o.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", show(o));
    assert!(lines[0].starts_with("ctguard: error: "), "{}", show(o));
    for p in parts {
        assert!(lines[0].contains(p), "{p:?} missing: {}", show(o));
    }
    lines[0].to_string()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// POLICY: one read, from a file, a pipe or stdin

#[test]
fn render_reads_a_pipe_and_stdin_like_the_file() {
    let s = Scratch::new("render");
    let file = s.file("p.toml", POLICY);
    let json = s.file("p.json", r#"{"notrack": [{"protocols": ["udp"], "ports": [5353]}]}"#);
    for fmt in ["nft", "iptables"] {
        let from_file = ctguard(&["render", "--format", fmt, file.to_str().expect("utf8")]);
        assert_ok(&from_file);
        assert!(text(&from_file.stdout).contains("5353"), "{}", show(&from_file));
        let fd = format!("/dev/fd/{PIPE_FD}");
        let from_pipe = ctguard_pipe_fd(&["render", "--format", fmt, &fd], POLICY.as_bytes());
        assert_ok(&from_pipe);
        assert_eq!(text(&from_pipe.stdout), text(&from_file.stdout), "render {fmt} from a pipe");
        let from_stdin = ctguard_stdin(&["render", "--format", fmt, "-"], POLICY.as_bytes());
        assert_ok(&from_stdin);
        assert_eq!(text(&from_stdin.stdout), text(&from_file.stdout), "render {fmt} from stdin");
    }
    // JSON is detected by its content when the name says nothing (a pipe, stdin).
    let body = std::fs::read(&json).expect("read");
    let from_file = ctguard(&["--json", "render", "--format", "nft", json.to_str().expect("utf8")]);
    assert_ok(&from_file);
    let from_stdin = ctguard_stdin(&["--json", "render", "--format", "nft", "-"], &body);
    assert_ok(&from_stdin);
    assert_eq!(text(&from_stdin.stdout), text(&from_file.stdout));
}

#[test]
fn an_empty_pipe_is_an_empty_document_never_the_file_read_twice() {
    // What a second read of a pipe sees: nothing. An empty document renders no table; the
    // point is that a pipe holding a policy gives that policy (above), and an empty one is
    // reported as empty, not confused with the built-in policy.
    let fd = format!("/dev/fd/{PIPE_FD}");
    let o = ctguard_pipe_fd(&["render", "--format", "nft", &fd], b"");
    let builtin = ctguard(&["render", "--format", "nft"]);
    assert_ok(&builtin);
    assert!(text(&builtin.stdout).contains("table inet ctguard"), "{}", show(&builtin));
    assert_ne!(text(&o.stdout), text(&builtin.stdout), "{}", show(&o));
}

#[test]
fn a_named_fifo_is_read_once_its_writer_comes() {
    let s = Scratch::new("fifo");
    let file = s.file("p.toml", POLICY);
    let fifo = s.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let f2 = fifo.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(f2, POLICY)
    });
    let from_fifo = ctguard(&["render", "--format", "nft", fifo.to_str().expect("utf8")]);
    writer.join().expect("join").expect("write fifo");
    let from_file = ctguard(&["render", "--format", "nft", file.to_str().expect("utf8")]);
    assert_ok(&from_fifo);
    assert_eq!(text(&from_fifo.stdout), text(&from_file.stdout));
}

#[test]
fn policy_that_is_not_a_file_or_a_pipe_is_exit_2_naming_it() {
    let s = Scratch::new("kinds");
    let dir = s.dir("adir");
    let sock_path = s.path("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock_path).expect("bind");
    let cases: [(&str, &str); 3] = [
        (dir.to_str().expect("utf8"), "a directory"),
        ("/dev/null", "a character device"),
        (sock_path.to_str().expect("utf8"), "a socket"),
    ];
    for (path, what) in cases {
        for verb in [&["render", "--format", "nft"][..], &["render"][..]] {
            let mut args = verb.to_vec();
            args.push(path);
            let o = ctguard(&args);
            assert_one_error_line(&o, &[&format!("policy {path}: {what}")]);
        }
    }
    let o = ctguard(&["render", "/nonexistent/ctguard-policy.toml"]);
    assert_one_error_line(&o, &["policy /nonexistent/ctguard-policy.toml: cannot read"]);
}

#[test]
fn apply_refuses_bad_policy_and_ruleset_inputs_before_any_agent() {
    let s = Scratch::new("apply-kinds");
    let run = s.dir("run");
    let state = s.dir("state");
    let dir = s.dir("adir");
    let sock_path = s.path("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock_path).expect("bind");
    let (run_s, state_s) = (run.to_str().expect("utf8"), state.to_str().expect("utf8"));
    let cases: [(&str, &str); 3] = [
        (dir.to_str().expect("utf8"), "a directory"),
        ("/dev/null", "a character device"),
        (sock_path.to_str().expect("utf8"), "a socket"),
    ];
    for (path, what) in cases {
        let o = ctguard(&["--run-dir", run_s, "--state-dir", state_s, "apply", "--timeout", "5s", path]);
        assert_one_error_line(&o, &[&format!("policy {path}: {what}")]);
        let o = ctguard(&["--run-dir", run_s, "--state-dir", state_s, "apply", "--ruleset", path]);
        assert_one_error_line(&o, &[&format!("--ruleset {path}: {what}")]);
        let o = ctguard(&["--run-dir", run_s, "--state-dir", state_s, "plan", path]);
        assert_one_error_line(&o, &[&format!("policy {path}: {what}")]);
    }
    // A bad policy from stdin and from a pipe is refused the same way a bad file is.
    let bad = "[[notrack]]\nprotocols = [\"udp\"]\nports = [70000]\n";
    let o = ctguard_stdin(&["--run-dir", run_s, "--state-dir", state_s, "apply", "-"], bad.as_bytes());
    assert_one_error_line(&o, &["policy -: notrack[0].ports[0]: 70000 is not a port"]);
    let fd = format!("/dev/fd/{PIPE_FD}");
    let o = ctguard_pipe_fd(&["--run-dir", run_s, "--state-dir", state_s, "apply", &fd], bad.as_bytes());
    assert_one_error_line(&o, &[&format!("policy {fd}: notrack[0].ports[0]: 70000 is not a port")]);
    // No agent was started: nothing in the run dir.
    assert_eq!(entries(&run), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// --netns: checked by the CLI, at once, nothing left behind

#[test]
fn netns_that_is_not_a_network_namespace_is_exit_2_at_once_with_nothing_left() {
    let s = Scratch::new("netns");
    let run = s.dir("run");
    let state = s.dir("state");
    let dir = s.dir("adir");
    let fifo = s.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let (run_s, state_s) = (run.to_str().expect("utf8"), state.to_str().expect("utf8"));
    let cases: [(&str, &str); 4] = [
        ("/etc/passwd", "a regular file"),
        (dir.to_str().expect("utf8"), "a directory"),
        (fifo.to_str().expect("utf8"), "a fifo"),
        ("/proc/self/ns/mnt", "a mount namespace"),
    ];
    for (path, what) in cases {
        for verb in [&["plan"][..], &["apply", "--timeout", "5s"][..], &["doctor"][..]] {
            let mut args = vec!["--run-dir", run_s, "--state-dir", state_s, "--netns", path];
            args.extend_from_slice(verb);
            let t0 = Instant::now();
            let o = ctguard(&args);
            let took = t0.elapsed();
            assert_one_error_line(&o, &[&format!("--netns {path}: not a network namespace ({what})")]);
            assert!(took < Duration::from_secs(1), "{verb:?} --netns {path} took {took:?}");
        }
    }
    // No agent, no pin, no socket, no journal.
    assert_eq!(entries(&run), Vec::<String>::new());
    assert_eq!(entries(&s.0), ["adir", "fifo", "run", "state"]);
    assert_eq!(entries(&dir), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// One escaped line per error, at most 20; clap errors one line

#[test]
fn user_strings_in_errors_cannot_forge_lines_or_drive_the_terminal() {
    let s = Scratch::new("escape");
    // A sysctl key with a newline, a forged error line and an escape sequence.
    let evil = s.file("evil.toml", "[sysctl]\n\"net.netfilter.x\\nctguard: error: forged\\u001b[31m\" = 1\n");
    let o = ctguard(&["render", "--format", "nft", evil.to_str().expect("utf8")]);
    let line = assert_one_error_line(&o, &["\\nctguard: error: forged\\u{1b}[31m"]);
    assert!(!o.stderr.contains(&0x1b), "{line}");
    // A --netns name with the same (refused before anything is opened or entered).
    let o = ctguard(&["--netns", "ns\nctguard: error: forged\x1b]0;title\x07", "plan"]);
    let line = assert_one_error_line(&o, &["ns\\nctguard: error: forged\\u{1b}]0;title\\u{7}"]);
    assert!(!o.stderr.iter().any(|&b| b < 0x20 && b != b'\n'), "{line}");
    // In clap's errors too.
    let o = ctguard(&["render", "--format", "nft\nctguard: error: forged"]);
    assert_one_error_line(&o, &["invalid value 'nft\\nctguard: error: forged'"]);
}

#[test]
fn at_most_twenty_error_lines_then_a_count() {
    let s = Scratch::new("many");
    let ports = vec!["70000"; 100_000].join(", ");
    let p = s.file("many.toml", &format!("[[notrack]]\nprotocols = [\"udp\"]\nports = [{ports}]\n"));
    let o = ctguard(&["render", "--format", "nft", p.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(o.stdout.is_empty());
    let stderr = text(&o.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 21, "{stderr:.2000}");
    assert!(lines.iter().all(|l| l.starts_with("ctguard: error: ")), "{stderr:.2000}");
    assert!(lines[19].contains("notrack[0].ports[19]: 70000 is not a port"), "{}", lines[19]);
    assert_eq!(lines[20], "ctguard: error: … and 99980 more");
}

#[test]
fn argument_errors_are_one_line_exit_2_and_help_and_version_are_unchanged() {
    let cases: [(&[&str], &str); 5] = [
        (&["render", "--format", "bogus"], "invalid value 'bogus' for '--format <FORMAT>'"),
        (&["render", "--no-such-flag"], "unexpected argument '--no-such-flag' found"),
        (&["extend"], "--by <BY>"),
        (&["no-such-verb"], "unrecognized subcommand 'no-such-verb'"),
        (&[], "a verb is required"),
    ];
    for (args, want) in cases {
        let o = ctguard(args);
        let line = assert_one_error_line(&o, &[want]);
        assert!(!line.contains("Usage:"), "{line}");
    }
    let o = ctguard(&["--help"]);
    assert_ok(&o);
    assert!(text(&o.stdout).contains("Usage: ctguard"), "{}", show(&o));
    assert!(text(&o.stdout).lines().count() > 5, "{}", show(&o));
    let o = ctguard(&["plan", "--help"]);
    assert_ok(&o);
    assert!(text(&o.stdout).contains("Usage: ctguard plan"), "{}", show(&o));
    let o = ctguard(&["--version"]);
    assert_ok(&o);
    assert_eq!(text(&o.stdout).trim(), format!("ctguard {}", env!("CARGO_PKG_VERSION")));
}
