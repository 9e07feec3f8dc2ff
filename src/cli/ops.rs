//! Operations verbs: `restore` (the boot-time re-apply of the committed, persisted policy),
//! `man` and `completions` (generated from the clap definition), and the logging setup
//! (stderr text or JSON with timestamps, or the systemd journal).
//!
//! `restore` goes **through the agent**: an ordinary policy transaction with a short dead-man
//! timeout, confirmed as soon as it is applied. So a re-apply is journaled with its own id
//! (`history`, `show`), takes the one-pending-transaction lock of its target, passes the same
//! preconditions, lint and kernel checks as `apply`, is tagged so a later `apply` replaces it
//! and a rollback finds it, and a crash in the middle is recovered like any apply. If the
//! confirm fails, the agent's timer rolls it back: the host keeps the firewall it booted with.
//! Before asking the agent, `restore` checks in the target whether the policy is already in
//! place (ctguard's objects equal up to the transaction tag, no accept insertion missing, every
//! sysctl at its value) and then does nothing: it is idempotent.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use serde_json::{json, Value};

use super::args::{Cli, CompletionsArgs, Global, LogFormat, ManArgs, RestoreArgs};
use crate::agent::protocol::{ApplyRequest, Request, Response};
use crate::backend::live as live_backend;
use crate::backend::policy_txn::variant_of;
use crate::exit::{Exit, Failure};
use crate::live::iptables_save;
use crate::model::auto::MachineFacts;
use crate::model::names::Tag;
use crate::model::Policy;
use crate::persist::COMMITTED_POLICY_FILE;
use crate::render::iptables::{notrack_rules, IpFamily, CHAIN_OUT, CHAIN_PRE, RAW_TABLE};
use crate::render::nft_ir::table_for;
use crate::render::nft_script::table_block;

/// Prefix of ctguard's fields in the journal (`txid` becomes `CTGUARD_TXID`).
pub const JOURNAL_FIELD_PREFIX: &str = "CTGUARD";

// ---------------------------------------------------------------------------------------------
// Logging

/// Parses `JOURNAL_STREAM` (`DEV:INO`, decimal).
fn parse_journal_stream(v: &str) -> Option<(u64, u64)> {
    let (dev, ino) = v.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// True when stderr is connected to the systemd journal: `JOURNAL_STREAM` names the device and
/// inode of file descriptor 2 (systemd sets it for services whose output goes to the journal;
/// an inherited value with stderr redirected elsewhere does not match).
fn stderr_is_journal() -> bool {
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().as_deref().and_then(parse_journal_stream) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else { return false };
    #[allow(clippy::unnecessary_cast)] // dev_t and ino_t are not u64 on every target
    let stderr_id = (st.st_dev as u64, st.st_ino as u64);
    stderr_id == (dev, ino)
}

/// Sets up tracing: `-v` levels (RUST_LOG overrides); text lines with timestamps on stderr,
/// one JSON object per line, or the systemd journal — chosen by `--log-format journald`, or
/// automatically for the default text format when stderr is the journal. Journal entries carry
/// ctguard's fields with the [`JOURNAL_FIELD_PREFIX`] (`journalctl CTGUARD_TXID=…`). When the
/// journal cannot be reached, logs go to stderr as text, with a warning.
pub(super) fn init_logging(verbose: u8, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let journald = format == LogFormat::Journald || (format == LogFormat::Text && stderr_is_journal());
    if journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.to_string()))
                    .with_syslog_identifier("ctguard".to_string());
                let _ = tracing_subscriber::registry().with(filter()).with(layer).try_init();
                return;
            }
            Err(e) => eprintln!("ctguard: warning: cannot reach the systemd journal ({e}); logging to stderr"),
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text | LogFormat::Journald => builder.try_init(),
    };
}

// ---------------------------------------------------------------------------------------------
// man and completions

/// Hand-written sections appended to the generated main page (roff).
const MAN_EXTRA: &str = r#".SH POLICY
A policy is a TOML document (or JSON with the same keys; \fB\-\fR reads it from standard input).
Unknown keys are errors; each error is one line naming the field, for example
\fBnotrack[0].ports[2]: 70000 is not a port (1\-65535)\fR. Without a POLICY argument the
built\-in policy is used: udp and tcp port 53, both sysctls \fB"auto"\fR.
.PP
.nf
backend = "auto"            # auto | nft | iptables\-nft | iptables\-legacy
persist = false             # on COMMITTED, make the change survive reboot
[[notrack]]
protocols = ["udp", "tcp"]  # required, non\-empty
ports = [53]                # required, non\-empty: 1\-65535 or "1000\-2000"
sources = []                # client prefixes, IPv4/IPv6, no host bits; empty = any
interfaces = []             # interface names; empty = all, lo included
local_only = true           # only traffic addressed to this host
accept_untracked = true     # insert "ct state untracked accept" where needed
flush_existing = false      # delete conntrack entries already open for these flows
[sysctl]                    # net.netfilter.* keys: integers, or "auto"
"net.netfilter.nf_conntrack_max" = "auto"
"net.netfilter.nf_conntrack_buckets" = "auto"
.fi
.TP
\fBbackend\fR
where the NOTRACK rules go: \fBnft\fR (table \fBinet ctguard\fR, chains at priority raw),
\fBiptables\-nft\fR or \fBiptables\-legacy\fR (chains \fBCTGUARD\-PRE\fR and \fBCTGUARD\-OUT\fR in
the raw table); \fBauto\fR picks nft when it is installed.
.TP
\fBpersist\fR
when the transaction is committed, write the sysctls, the module options and the policy so
that \fBctguard\-restore.service\fR re\-applies it at boot (see FILES).
.TP
\fBnotrack\fR
one entry per group of flows to exempt from connection tracking, in both directions:
prerouting by destination port (and \fBsources\fR, \fBinterfaces\fR, with \fBlocal_only\fR only
traffic to a local address), output by source port.
.TP
\fBaccept_untracked\fR
an accept in ctguard's table cannot override a drop in another table: for each filter chain
that accepts these flows while tracked and drops them once untracked, ctguard inserts one
\fBct state untracked accept\fR for exactly these flows just before the rule that drops them,
tagged \fBctguard:TXID\fR. Without it, \fBplan\fR reports the blackhole and \fBapply\fR refuses
unless \fB\-\-force\fR.
.TP
\fBflush_existing\fR
after the apply, delete the conntrack entries already open for these flows.
.TP
\fBsysctl\fR
\fBnet.netfilter.*\fR keys with integer values; \fBnf_conntrack_max\fR and
\fBnf_conntrack_buckets\fR also take \fB"auto"\fR (RAM/16384/(bits/32), a power of two, never
lower than the live value). Outside the initial network namespace the host\-only keys
(\fBnf_conntrack_max\fR, \fBnf_conntrack_buckets\fR, \fBnf_conntrack_expect_max\fR) cannot be
written: \fB"auto"\fR values are skipped with a warning, explicit values are exit 2. Old names
such as \fBnet.ipv4.netfilter.ip_conntrack_max\fR are refused with the current name.
.SH "SAFETY MODEL"
Every change is a transaction with a dead\-man timer:
.IP 1. 4
\fBapply\fR validates the policy, lints it against the live ruleset, checks it with the kernel,
journals it (PREPARED) and applies it atomically (one nft transaction, or
\fBiptables\-restore \-\-noflush\fR); the exact prior state is saved.
.IP 2. 4
The transaction is then PENDING until its deadline (\fB\-\-timeout\fR, default 60 s, on
CLOCK_BOOTTIME). \fBconfirm\fR commits it; \fBextend\fR moves the deadline; \fBrollback\fR,
the deadline, or SIGTERM to the agent restore the prior state (ROLLED_BACK). A rollback that
fails is retried and reported (exit 7, ROLLBACK_FAILED).
.IP 3. 4
The timer belongs to the \fBagent\fR, a detached process the CLI starts on demand: closing the
SSH session, losing the terminal or killing the CLI changes nothing. The agent keeps the
journal, serves root only on its socket and exits when nothing is pending. Stopping it (for
example \fBsystemctl stop ctguard\fR, or removing the package) rolls back whatever is pending.
.IP 4. 4
Over SSH, \fBconfirm\fR must come from a NEW connection (exit 8 otherwise), which proves that
the change did not lock you out; \fB\-\-probe\fR checks services before the confirm counts,
\fB\-\-auto\-confirm\fR commits when every probe passes.
.IP 5. 4
One pending transaction per target network namespace (exit 4 for another). After a crash or a
reboot the journal is recovered: same boot, the timer is re\-armed or the change rolled back;
another boot, nothing is restored (the host booted its persisted configuration).
.SH "JSON OUTPUT"
With \fB\-\-json\fR every verb prints exactly one JSON object on standard output, on success and
on failure:
\fB{"exit": 0, "error": null, "data": {...}}\fR.
\fBexit\fR is the exit status, \fBerror\fR the failure's message (null on success; standard
error still carries the \fBctguard: error:\fR line) and \fBdata\fR what the verb reports (null
when a failure left nothing to report).
.SH PRIVILEGES
Every verb except \fBrender\fR, \fBman\fR and \fBcompletions\fR needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN in the initial user namespace); \fBplan\fR validates the policy first. Without
them ctguard exits 2 with "run ctguard as root".
.SH "EXIT STATUS"
.TP
\fB0\fR
ok (also: confirm of an already committed transaction)
.TP
\fB1\fR
internal error
.TP
\fB2\fR
bad input, unknown id or failed precondition; nothing changed
.TP
\fB3\fR
refused by the kernel, a backend, a check or a lint error; nothing changed
.TP
\fB4\fR
another transaction is pending on that target, or the lock is held
.TP
\fB5\fR
the transaction was rolled back instead of doing what was asked
.TP
\fB6\fR
the agent is unreachable
.TP
\fB7\fR
rollback failed: state unknown, operator needed
.TP
\fB8\fR
confirmation refused (not a new connection)
.SH FILES
.TP
\fI/run/ctguard/ctguard.sock\fR
the agent's socket (root only); \fI/run/ctguard/agent.log\fR is the log of a detached agent,
\fI/run/ctguard/ns/\fR holds the namespace pins
.TP
\fI/var/lib/ctguard/txn/\fR
the journal, one JSON record per transaction
.TP
\fI/var/lib/ctguard/committed\-policy.toml\fR
the committed policy saved by persistence, re\-applied at boot by \fBctguard restore\fR
.TP
\fI/etc/sysctl.d/90\-ctguard.conf\fR, \fI/etc/modules\-load.d/ctguard.conf\fR, \fI/etc/modprobe.d/ctguard.conf\fR
written when a transaction with persistence is committed
.TP
\fIctguard.service\fR, \fIctguard\-recover.service\fR, \fIctguard\-restore.service\fR
the agent; journal recovery at boot; the boot\-time re\-apply of the persisted policy
.SH ENVIRONMENT
.TP
\fBCTGUARD_STATE_DIR\fR, \fBCTGUARD_RUN_DIR\fR
defaults of \fB\-\-state\-dir\fR and \fB\-\-run\-dir\fR
.TP
\fBRUST_LOG\fR
log filter (overrides \fB\-v\fR)
.TP
\fBJOURNAL_STREAM\fR
when it names standard error, logs go to the systemd journal with the field \fBCTGUARD_TXID\fR
.SH "SEE ALSO"
\fBnft\fR(8), \fBiptables\-apply\fR(8), \fBnetplan\-try\fR(8), \fBsystemd\-sysctl.service\fR(8)
"#;

fn man_page(cmd: clap::Command) -> clap_mangen::Man {
    let version = cmd.get_version().unwrap_or("").to_string();
    clap_mangen::Man::new(cmd).section("8").manual("System Administration").source(format!("ctguard {version}"))
}

/// The generated main page with [`MAN_EXTRA`] inserted before its VERSION section.
fn render_main_page(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let mut page = Vec::new();
    man_page(cmd).render(&mut page)?;
    let page = String::from_utf8_lossy(&page);
    let at = page.find(".SH VERSION").unwrap_or(page.len());
    out.write_all(page[..at].as_bytes())?;
    out.write_all(MAN_EXTRA.as_bytes())?;
    out.write_all(page[at..].as_bytes())
}

/// `ctguard man`: the main page on stdout (roff, section 8), or with `--out-dir` that page as
/// `ctguard.8` plus `ctguard-VERB.8` for every verb. Under `--json` the page is the envelope's
/// `data.text` (`data.files` with `--out-dir`).
pub(super) fn man(a: &ManArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = &a.out_dir else {
        let mut out = Vec::new();
        render_main_page(cmd, &mut out).map_err(|e| vec![Failure::internal(format!("man: {e}"))])?;
        if global.json {
            super::print_json(&json!({"format": "roff", "text": String::from_utf8_lossy(&out)}));
        } else {
            super::out::stdout_bytes(&out);
        }
        return Ok(Exit::Ok);
    };
    let fail = |p: &Path, e: std::io::Error| vec![Failure::bad_input(format!("{}: {e}", p.display()))];
    std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
    let mut files = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let path = man_page(sub.clone()).generate_to(dir).map_err(|e| fail(dir, e))?;
        files.push(path.display().to_string());
    }
    let main = dir.join("ctguard.8");
    let mut out = Vec::new();
    render_main_page(cmd, &mut out).map_err(|e| fail(&main, e))?;
    std::fs::write(&main, out).map_err(|e| fail(&main, e))?;
    files.push(main.display().to_string());
    if global.json {
        super::print_json(&json!({"files": files}));
    } else {
        for f in &files {
            println!("{f}");
        }
    }
    Ok(Exit::Ok)
}

/// `ctguard completions SHELL`: the completion script on stdout (under `--json`, the
/// envelope's `data.text`).
pub(super) fn completions(a: &CompletionsArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "ctguard", &mut out);
    if global.json {
        super::print_json(&json!({"shell": a.shell.to_string(), "text": String::from_utf8_lossy(&out)}));
    } else {
        super::out::stdout_bytes(&out);
    }
    Ok(Exit::Ok)
}

// ---------------------------------------------------------------------------------------------
// restore

fn normalized_lines(text: &str) -> Vec<String> {
    text.lines().map(|l| crate::model::names::normalize_tags(l.trim())).filter(|l| !l.is_empty()).collect()
}

/// What differs between `policy` and the live state of the calling thread's namespace; empty
/// when the policy is in place. Reads only.
pub(crate) fn differences(policy: &Policy, facts: MachineFacts) -> Result<Vec<String>, String> {
    // The planning core apply and plan use: the same live read, plan and sysctl resolution.
    let tag = Tag::preview();
    let req = crate::backend::policy_txn::PolicyRequest {
        policy: policy.clone(),
        tag: tag.clone(),
        force: false,
        ssh: None,
        previous: None,
    };
    let prepared = crate::backend::policy_txn::prepare_with(&req, facts, crate::backend::policy_txn::PrepareMode::PLAN)
        .map_err(|e| crate::backend::policy_txn::chain_text(&e))?;
    let live = &prepared.live;
    let backend = prepared.backend;
    let mut diffs = Vec::new();
    match variant_of(backend) {
        None => {
            let current = live_backend::ctguard_table_text().map_err(|e| e.to_string())?;
            let t = table_for(policy, &tag);
            let desired = if t.is_empty() { String::new() } else { table_block(&t) };
            if normalized_lines(current.as_deref().unwrap_or("")) != normalized_lines(&desired) {
                diffs.push(match current {
                    None => "table inet ctguard is missing".to_string(),
                    Some(_) => "table inet ctguard differs from the policy".to_string(),
                });
            }
        }
        Some(v) => {
            for fam in IpFamily::ALL {
                let v6 = fam == IpFamily::V6;
                let rules = notrack_rules(policy, fam, &tag);
                let dump = match live.iptables.iter().find(|d| d.variant == v && d.v6 == v6) {
                    Some(d) => Some(iptables_save::parse(&d.text).map_err(|e| e.to_string())?),
                    None => None,
                };
                let mut current = Vec::new();
                for chain in [CHAIN_PRE, CHAIN_OUT] {
                    if let Some(c) = dump.as_ref().and_then(|d| d.chain(RAW_TABLE, chain)) {
                        current.extend(c.rules.iter().map(|r| crate::model::names::normalize_tags(&r.line)));
                    }
                }
                let desired: Vec<String> =
                    rules.rules.iter().map(|r| crate::model::names::normalize_tags(&r.append_line())).collect();
                if current != desired {
                    diffs.push(format!("{} raw CTGUARD-PRE/CTGUARD-OUT differ from the policy", fam.tool_prefix()));
                }
                if rules.is_empty() {
                    continue;
                }
                for j in &rules.jumps {
                    let present = dump.as_ref().and_then(|d| d.chain(RAW_TABLE, j.from)).is_some_and(|c| {
                        c.rules.iter().any(|r| r.args.len() == 2 && r.args[0] == "-j" && r.args[1] == j.to)
                    });
                    if !present {
                        diffs.push(format!("{} raw {}: the jump to {} is missing", fam.tool_prefix(), j.from, j.to));
                    }
                }
            }
        }
    }
    for ins in &prepared.plan.insertions {
        diffs.push(format!("{}: the accept for untracked flows is missing", ins.chain));
    }
    for c in prepared.sysctls.iter().filter(|c| !c.unchanged && c.skipped.is_none()) {
        let old = c.old.map_or("(missing)".to_string(), |v| v.to_string());
        diffs.push(format!("sysctl {} is {old}, the policy wants {}", c.key, c.new));
    }
    Ok(diffs)
}

fn refused_by_agent(r: &Response, what: &str) -> Vec<Failure> {
    vec![Failure::new(Exit::from_code(r.exit), format!("{what}: {}", r.error.as_deref().unwrap_or("failed")))]
}

/// `ctguard restore [--policy-file F]`: re-applies the committed policy persistence saved
/// (default `$STATE_DIR/committed-policy.toml`) to the target (`--netns`, else the caller's
/// namespace), through the agent, confirmed at once; nothing when it is already in place or
/// when nothing was persisted (the default file is absent).
pub(super) fn restore(a: &RestoreArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let explicit = a.policy_file.is_some();
    let path: PathBuf = a.policy_file.clone().unwrap_or_else(|| global.state_dir.join(COMMITTED_POLICY_FILE));
    let shown = path.display().to_string();
    if !explicit && !path.exists() {
        if global.json {
            super::print_json(&json!({"changed": false, "persisted": false, "policy_file": shown}));
        } else {
            println!("restore: nothing persisted ({shown} does not exist); nothing to do");
        }
        return Ok(Exit::Ok);
    }
    // Read once: what is checked against the live state is what is sent.
    let loaded = super::load_policy(Some(&shown))?;
    let policy = loaded.policy;
    let Some(source) = loaded.source else { return Err(vec![Failure::internal("restore: no policy document")]) };
    let netns = super::netns_for_agent(global)?;
    let timeout =
        crate::duration::parse_duration(&a.timeout).map_err(|e| vec![Failure::bad_input(format!("--timeout: {e}"))])?;
    let (_, target, facts) = super::open_target(global)?;
    let diffs = target
        .run(|| differences(&policy, facts))
        .map_err(|e| vec![Failure::internal(e.to_string())])?
        .map_err(|e| vec![Failure::refused(format!("cannot read the live state: {e}"))])?;
    drop(target);
    if diffs.is_empty() {
        if global.json {
            super::print_json(&json!({"changed": false, "persisted": true, "policy_file": shown}));
        } else {
            println!("restore: the committed policy ({shown}) is already in place; nothing to do");
        }
        return Ok(Exit::Ok);
    }
    for d in &diffs {
        tracing::info!("restore: {d}");
    }
    let req = Request::Apply(ApplyRequest {
        policy_format: Some(source.format_name().to_string()),
        policy_text: Some(source.text),
        netns,
        netns_id: None,
        comment: Some("ctguard restore: the persisted committed policy".into()),
        from: None,
        timeout_secs: timeout.as_secs(),
        force: a.force,
        ssh: None,
        ruleset: None,
        // A boot unit has no SSH connection to prove anything about.
        options: crate::txn::TxnOptions { allow_same_connection: true, ..Default::default() },
    });
    let r = super::txn::ask(global, req)?;
    if r.exit != 0 {
        return Err(refused_by_agent(&r, "restore: apply"));
    }
    let txid = r.data["txid"].as_str().unwrap_or_default().to_string();
    let warnings: Vec<Value> = r.data["warnings"].as_array().cloned().unwrap_or_default();
    let c = super::txn::ask(global, Request::Confirm { txid: Some(txid.clone()), netns: None })?;
    if c.exit != 0 {
        // Not confirmed: roll back now rather than at the deadline (best effort; the agent's
        // timer does it anyway).
        let _ = super::txn::ask(global, Request::Rollback { txid: Some(txid.clone()), netns: None });
        return Err(refused_by_agent(&c, &format!("restore: confirm of {txid} (rolled back)")));
    }
    tracing::info!(txid = txid.as_str(), "restore: re-applied and committed {shown}");
    if global.json {
        super::print_json(&json!({
            "changed": true,
            "persisted": true,
            "policy_file": shown,
            "txid": txid,
            "differences": diffs,
            "warnings": warnings,
        }));
    } else {
        println!("restore: re-applied {shown} as {txid} (committed)");
        for d in &diffs {
            println!("  was: {d}");
        }
        for w in &warnings {
            println!("warning: {}", w.as_str().unwrap_or(""));
        }
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_normalized() {
        assert_eq!(
            crate::model::names::normalize_tags(r#"udp dport @ports_0 notrack comment "ctguard:20261123-162354-ed34""#),
            r#"udp dport @ports_0 notrack comment "ctguard:preview""#
        );
        assert_eq!(
            crate::model::names::normalize_tags(
                "-A CTGUARD-PRE -m comment --comment ctguard:20261123-162354-ed34 -j CT --notrack"
            ),
            "-A CTGUARD-PRE -m comment --comment ctguard:preview -j CT --notrack"
        );
        assert_eq!(
            crate::model::names::normalize_tags("a ctguard:x b ctguard:y"),
            "a ctguard:preview b ctguard:preview"
        );
        assert_eq!(crate::model::names::normalize_tags("no tag"), "no tag");
        assert_eq!(crate::model::names::normalize_tags("ctguard:"), "ctguard:preview");
    }

    #[test]
    fn journal_stream_parses() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:12345\n"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream("81"), None);
    }
}
