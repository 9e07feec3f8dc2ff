//! Inputs end to end, against a real agent in throwaway namespaces (issues 11, 14, 15):
//! `apply /dev/fd/N` from a pipe applies the policy in the pipe (never an empty one read a
//! second time), `apply -` reads stdin, `--ruleset` from a pipe too, `plan` from a pipe or stdin
//! says what it says from the file; and `--netns /proc/self/ns/net` names the CALLER's
//! namespace for `plan` and `apply`, never the agent's.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::harness::{Ns, STATEFUL};
use crate::txn_cli::{ok, Ctg};

const BIN: &str = env!("CARGO_BIN_EXE_ctguard");
#[path = "../../tests/support/pipe.rs"]
mod pipe;
use pipe::{run_with_pipe, PIPE_FD};

/// `ctguard --state-dir … --run-dir … ARGS` of this installation (no shell).
fn cmd(ctg: &Ctg, args: &[&str]) -> Command {
    with_ctg_args(Command::new(BIN), ctg, args)
}

/// Appends this installation's dirs and `args` to `c` (whose program is, or runs, ctguard).
fn with_ctg_args(mut c: Command, ctg: &Ctg, args: &[&str]) -> Command {
    c.arg("--state-dir")
        .arg(ctg.base.join("state"))
        .arg("--run-dir")
        .arg(ctg.base.join("run"))
        .args(args)
        .env_remove("SSH_CONNECTION")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

/// Runs with `input` on stdin.
fn run_with_stdin(mut c: Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("wait")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

fn txid_of(out: &Output) -> String {
    json_of(out)["data"]["txid"].as_str().unwrap_or_default().to_string()
}

fn policy(port: u16) -> String {
    format!("[[notrack]]\nprotocols = [\"udp\"]\nports = [{port}]\n")
}

#[test]
fn apply_from_a_pipe_or_stdin_applies_the_policy_it_was_given() {
    let ns = Ns::new("inpipe");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let ctg = Ctg::new();
    let fd = format!("/dev/fd/{PIPE_FD}");
    // plan from a pipe and from stdin says what plan of the file says.
    let dir = ctg.base.join("p");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("p.toml");
    std::fs::write(&file, policy(5353)).expect("write");
    let from_file = cmd(&ctg, &["plan", "--netns", ns.name(), file.to_str().expect("utf8")]).output().expect("plan");
    ok(&from_file);
    assert!(String::from_utf8_lossy(&from_file.stdout).contains("5353"), "{from_file:?}");
    let from_pipe = run_with_pipe(cmd(&ctg, &["plan", "--netns", ns.name(), &fd]), policy(5353).as_bytes());
    ok(&from_pipe);
    assert_eq!(from_pipe.stdout, from_file.stdout);
    let from_stdin = run_with_stdin(cmd(&ctg, &["plan", "--netns", ns.name(), "-"]), policy(5353).as_bytes());
    ok(&from_stdin);
    assert_eq!(from_stdin.stdout, from_file.stdout);

    // apply /dev/fd/N: the policy in the pipe is what is applied (not an empty one).
    let out = run_with_pipe(
        cmd(&ctg, &["--json", "apply", "--netns", ns.name(), "--timeout", "60s", &fd]),
        policy(5353).as_bytes(),
    );
    ok(&out);
    let id = txid_of(&out);
    let during = ns.nft_list();
    assert!(during.contains("table inet ctguard"), "{during}");
    assert!(during.contains("5353"), "the pipe's policy was not applied:\n{during}");
    let shown = ctg.json(&["show", &id]);
    assert!(shown["policy"].to_string().contains("5353"), "{shown}");
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ns.nft_list(), before);

    // apply -: the policy on stdin.
    let out = run_with_stdin(
        cmd(&ctg, &["--json", "apply", "--netns", ns.name(), "--timeout", "60s", "-"]),
        policy(5354).as_bytes(),
    );
    ok(&out);
    let id = txid_of(&out);
    let during = ns.nft_list();
    assert!(during.contains("5354"), "the stdin policy was not applied:\n{during}");
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ns.nft_list(), before);

    // apply --ruleset /dev/fd/N: the ruleset in the pipe.
    let ruleset = "table inet piped {\n\tchain c {\n\t\ttcp dport 4242 drop\n\t}\n}\n";
    let out = run_with_pipe(
        cmd(&ctg, &["--json", "apply", "--netns", ns.name(), "--timeout", "60s", "--ruleset", &fd]),
        ruleset.as_bytes(),
    );
    ok(&out);
    let id = txid_of(&out);
    let during = ns.nft_list();
    assert!(during.contains("table inet piped") && during.contains("4242"), "{during}");
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ns.nft_list(), before);
}

/// `ip netns exec NS ctguard …`: a CLI whose own namespace is NS.
fn in_ns(ctg: &Ctg, ns: &Ns, args: &[&str]) -> Output {
    let ip = ctguard::backend::exec::Tool::find("ip").expect("ip").path;
    let mut c = Command::new(ip);
    c.args(["netns", "exec", ns.name(), BIN]);
    with_ctg_args(c, ctg, args).output().expect("ip netns exec ctguard")
}

fn ns_id(path: &str) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.dev(), m.ino())
}

#[test]
fn netns_proc_self_names_the_callers_namespace_for_plan_and_apply() {
    // The agent lives in `home` (it is started by a CLI running there), the caller in
    // `caller`; a third namespace holds the transaction that keeps the agent up.
    let home = Ns::new("selfhome");
    let caller = Ns::new("selfcaller");
    let keep = Ns::new("selfkeep");
    caller.nft(STATEFUL);
    let caller_before = caller.nft_list();
    let home_before = home.nft_list();
    let ctg = Ctg::new();
    let out = in_ns(&ctg, &home, &["--json", "apply", "--netns", keep.name(), "--timeout", "120s"]);
    ok(&out);
    let keep_id = txid_of(&out);
    let agent = ctg.agent_pid().expect("agent pid");
    assert_eq!(
        ns_id(&format!("/proc/{agent}/ns/net")),
        ns_id(&format!("/run/netns/{}", home.name())),
        "the agent does not live in the home namespace; the test proves nothing"
    );

    // plan: the caller's namespace (a stateful firewall: an insertion is needed there; the
    // agent's home has no ruleset and needs none).
    let out = in_ns(&ctg, &caller, &["--json", "plan", "--netns", "/proc/self/ns/net"]);
    ok(&out);
    let plan = json_of(&out)["data"].take();
    assert!(!plan["insertions"].as_array().expect("insertions").is_empty(), "{plan}");
    let home_plan = in_ns(&ctg, &home, &["--json", "plan", "--netns", "/proc/self/ns/net"]);
    ok(&home_plan);
    assert!(json_of(&home_plan)["data"]["insertions"].as_array().expect("insertions").is_empty());

    // apply: changes the caller's namespace, not the agent's.
    let out = in_ns(&ctg, &caller, &["--json", "apply", "--netns", "/proc/self/ns/net", "--timeout", "60s"]);
    ok(&out);
    let id = txid_of(&out);
    let during = caller.nft_list();
    assert!(during.contains("table inet ctguard"), "the caller's namespace was not changed:\n{during}");
    assert_eq!(home.nft_list(), home_before, "the agent's namespace was changed");
    let shown = ctg.json(&["show", &id]);
    assert_eq!(shown["target"].as_str(), Some(caller.name()), "{shown}");
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(caller.nft_list(), caller_before);
    ok(&ctg.run(&["rollback", &keep_id]));
}
