//! The `ctguard` command: argument parsing ([`args`]) kept apart from the verbs that act.
//! Every error leaves as one line on stderr (`ctguard: error: …`) and a documented exit code.
//! Under `--json` every verb prints exactly one JSON object on stdout, success or error: the
//! envelope `{"exit": N, "error": null | "…", "data": …}` ([`print_json`] sets `data`).
//! A closed stdout (`ctguard history | head -1`) ends a verb quietly with its own exit code.

// `print!`/`println!`/`eprint!`/`eprintln!` for every verb of the CLI: std's panic when the
// reader went away (EPIPE), these do not (see [`out`]). Defined before the `mod` lines so that
// they shadow std's in every submodule. The agent is a verb of this binary too: its sockets
// never go through these, and SIGPIPE stays ignored (std's default), so a client that closes
// its connection cannot kill it.
macro_rules! print {
    ($($arg:tt)*) => { $crate::cli::out::stdout(format_args!($($arg)*)) };
}
macro_rules! println {
    () => { $crate::cli::out::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}
macro_rules! eprint {
    ($($arg:tt)*) => { $crate::cli::out::stderr(format_args!($($arg)*)) };
}
macro_rules! eprintln {
    () => { $crate::cli::out::stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

pub mod args;
mod doctor;
pub(crate) mod input;
mod ops;
pub(crate) mod plan;
mod plan_ruleset;
mod privilege;
mod render;
mod txn;

use clap::Parser;

use crate::exit::{error_lines, Exit, Failure};
use crate::model::{parse_policy, Policy};
use args::{Cli, Command};

/// Runs the CLI with the process arguments; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return argument_error(&e),
    };
    let code = run(&cli);
    out::flush();
    code
}

/// Runs the verb; under `--json` prints the one envelope. Returns the exit code.
fn run(cli: &Cli) -> i32 {
    ops::init_logging(cli.global.verbose, cli.global.log_format);
    let result = privilege::check_root(&cli.command).and_then(|()| {
        // Every verb that may act on or report transactions first revives a missing agent.
        match &cli.command {
            // `status` and `history` revive it themselves, from the journal they read anyway.
            Command::Agent(_)
            | Command::Recover
            | Command::Render(_)
            | Command::Man(_)
            | Command::Completions(_)
            | Command::Status
            | Command::History => {}
            // `plan --ruleset` needs no agent and starts none.
            Command::Plan(a) if a.ruleset.is_some() => {}
            _ => txn::revive_agent_if_needed(&cli.global),
        }
        run_verb(cli)
    });
    let result = match (result, out::stdout_error()) {
        // Output lost on a full disk or a failing device is an error; a closed pipe is not.
        (Ok(_), Some(e)) => Err(vec![Failure::internal(format!("cannot write to stdout: {e}"))]),
        (r, _) => r,
    };
    let result = result.map_err(privilege::explain);
    let (exit, error) = match &result {
        Ok(exit) => (*exit, None),
        Err(failures) => (print_failures(failures), Some(envelope_error(failures))),
    };
    if cli.global.json {
        print_envelope(exit, error, take_json());
    }
    exit.code()
}

fn run_verb(cli: &Cli) -> Result<Exit, Vec<Failure>> {
    match &cli.command {
        Command::Render(a) => render::run(a, &cli.global),
        Command::Plan(a) if a.ruleset.is_some() => plan_ruleset::run(a, &cli.global),
        Command::Plan(a) => plan::run(a, &cli.global),
        Command::Apply(a) => txn::apply(a, &cli.global),
        Command::Confirm(a) => txn::confirm(a, &cli.global),
        Command::Extend { by, txid } => txn::extend(txid, by, &cli.global),
        Command::Rollback(a) => txn::rollback(a, &cli.global),
        Command::Status => txn::status(&cli.global),
        Command::History => txn::history(&cli.global),
        Command::Show(a) => txn::show(a, &cli.global),
        Command::Doctor(a) => doctor::run(a, &cli.global),
        Command::Agent(a) => txn::agent(a, &cli.global),
        Command::Recover => txn::recover(&cli.global),
        Command::Restore(a) => ops::restore(a, &cli.global),
        Command::Man(a) => ops::man(a, &cli.global),
        Command::Completions(a) => ops::completions(a, &cli.global),
    }
}

/// Prints failures on stderr, one escaped line each, at most [`crate::exit::MAX_ERROR_LINES`] and a count
/// of the rest; returns the exit code (that of the last failure; internal when none).
fn print_failures(failures: &[Failure]) -> Exit {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    for line in error_lines(failures) {
        let _ = writeln!(err, "{line}");
    }
    failures.last().map_or(Exit::Internal, |f| f.exit)
}

/// Clap's verdict on the arguments: `--help` and `--version` print as clap renders them (exit
/// 0); every argument error is one escaped `ctguard: error:` line, exit 2.
fn argument_error(e: &clap::Error) -> i32 {
    if !e.use_stderr() {
        let _ = e.print();
        return Exit::Ok.code();
    }
    // A value with a newline would be split by the line-based rendering below: render the
    // same parse over the arguments with their control characters escaped instead (same
    // error kind), so the value shows as typed, escaped, within its line.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let has_control = |a: &std::ffi::OsString| a.to_string_lossy().chars().any(char::is_control);
    let message = if args.iter().any(has_control) {
        let escaped = args.iter().map(|a| crate::exit::escape_for_terminal(&a.to_string_lossy()).into_owned());
        match Cli::try_parse_from(escaped) {
            Err(e2) if e2.kind() == e.kind() => one_line_clap_error(&e2),
            _ => one_line_clap_error(e),
        }
    } else {
        one_line_clap_error(e)
    };
    let failure = Failure::bad_input(message);
    let exit = print_failures(std::slice::from_ref(&failure));
    if json_requested(&args) {
        print_envelope(exit, Some(failure.message), None);
    }
    out::flush();
    exit.code()
}

/// `--json` among the arguments (before a `--`), for errors found before they are parsed.
fn json_requested(args: &[std::ffi::OsString]) -> bool {
    args.iter().skip(1).take_while(|a| *a != "--").any(|a| a == "--json")
}

/// Clap's multi-line error as one line: the first line without its `error: ` prefix, then the
/// hints (possible values, tips), without the usage and the "for more information" line.
fn one_line_clap_error(e: &clap::Error) -> String {
    use clap::error::ErrorKind;
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return "a verb is required; see 'ctguard --help'".to_string();
    }
    let rendered = e.render().to_string();
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    let mut parts = vec![first.strip_prefix("error: ").unwrap_or(first).to_string()];
    let mut in_usage = false;
    for l in lines {
        if l.starts_with("Usage:") {
            in_usage = true;
            continue;
        }
        if l.starts_with("For more information") {
            continue;
        }
        if in_usage && !l.starts_with('[') && !l.starts_with("tip:") {
            continue;
        }
        parts.push(l.to_string());
    }
    parts.push("see --help".to_string());
    parts.join("; ")
}

/// `--netns` for a request to the agent, resolved and checked in this process (exit 2 for
/// anything that is not a network namespace, before the agent is asked or started): see
/// [`crate::netns::resolve_for_agent`].
pub(crate) fn netns_for_agent(global: &args::Global) -> Result<Option<String>, Vec<Failure>> {
    global
        .netns
        .as_deref()
        .map(|n| crate::netns::resolve_for_agent(n).map_err(|e| vec![Failure::bad_input(e.to_string())]))
        .transpose()
}

/// A policy from the command line: validated, with the exact document it came from.
pub(crate) struct LoadedPolicy {
    /// The validated policy.
    pub policy: Policy,
    /// The document as read (once); `None` for the built-in policy.
    pub source: Option<input::PolicySource>,
}

/// Loads the policy named on the command line: a path, a pipe (`<(…)`, `/dev/fd/N`), `-` for
/// stdin, or none for the built-in policy. The argument is read exactly once; every reading or
/// validation problem becomes one exit-2 failure.
pub(crate) fn load_policy(arg: Option<&str>) -> Result<LoadedPolicy, Vec<Failure>> {
    let Some(arg) = arg else { return Ok(LoadedPolicy { policy: Policy::builtin(), source: None }) };
    let source = input::read_policy(arg).map_err(|f| vec![f])?;
    let policy = parse_policy(&source.text, source.format).map_err(|errs| {
        errs.into_iter().map(|e| Failure::bad_input(format!("policy {arg}: {e}"))).collect::<Vec<_>>()
    })?;
    Ok(LoadedPolicy { policy, source: Some(source) })
}

/// The target of `--netns` (or the caller's namespace), opened, and this machine's facts for
/// `"auto"`. Bad names and missing namespaces are exit 2.
pub(crate) fn open_target(
    global: &args::Global,
) -> Result<(crate::netns::TargetSpec, crate::netns::Target, crate::model::auto::MachineFacts), Vec<Failure>> {
    use crate::netns::{Target, TargetSpec};
    let spec = match &global.netns {
        Some(s) => TargetSpec::parse(s).map_err(|e| vec![Failure::bad_input(e.to_string())])?,
        None => TargetSpec::Current,
    };
    let target = Target::open(&spec).map_err(|e| vec![Failure::bad_input(e.to_string())])?;
    let ram = crate::sysctl::mem_total_bytes()
        .ok_or_else(|| vec![Failure::internal("cannot read MemTotal from /proc/meminfo")])?;
    Ok((spec, target, crate::model::auto::MachineFacts::with_ram(ram)))
}

/// The `data` of the `--json` envelope, set by the verb ([`print_json`]) and printed by
/// [`main`] with the verb's exit code and error.
static JSON_DATA: std::sync::Mutex<Option<serde_json::Value>> = std::sync::Mutex::new(None);

/// Sets what the verb reports under `--json`: the `data` of the envelope
/// `{"exit", "error", "data"}` that [`main`] prints once the verb has returned, with its exit
/// code and, on failure, its error (so a verb that reports and then fails, such as `plan`
/// with lint errors, keeps its report). A second call replaces the first.
pub(crate) fn print_json(v: &serde_json::Value) {
    *JSON_DATA.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(v.clone());
}

fn take_json() -> Option<serde_json::Value> {
    JSON_DATA.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
}

/// The envelope's `error`: the failures' messages, unescaped (JSON escapes them), joined with
/// `"; "`, at most [`crate::exit::MAX_ERROR_LINES`] and a count of the rest.
fn envelope_error(failures: &[Failure]) -> String {
    let mut parts: Vec<&str> = failures.iter().take(crate::exit::MAX_ERROR_LINES).map(|f| f.message.as_str()).collect();
    let more = failures.len().saturating_sub(crate::exit::MAX_ERROR_LINES);
    let more_text = format!("… and {more} more");
    if more > 0 {
        parts.push(&more_text);
    }
    if parts.is_empty() {
        return "failed".to_string();
    }
    parts.join("; ")
}

/// The one JSON shape of every verb under `--json`, on stdout, pretty-printed:
/// `{"exit": N, "error": null | "message", "data": null | {…}}`. `exit` is the process exit
/// code; `error` is what stderr says (one line per failure there, `"; "`-joined here); `data`
/// is what the verb reports (see DESIGN §5), kept on failure when the verb had it.
fn print_envelope(exit: Exit, error: Option<String>, data: Option<serde_json::Value>) {
    let v = serde_json::json!({"exit": exit.code(), "error": error, "data": data});
    match serde_json::to_string_pretty(&v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("ctguard: error: cannot encode JSON: {}", crate::exit::escape_for_terminal(&e.to_string())),
    }
}

/// Writing to stdout and stderr without panicking (the macros at the top of this module).
pub(crate) mod out {
    use std::io::Write;
    use std::sync::Mutex;

    /// The first stdout error other than a closed pipe (a full disk), reported by [`super::main`].
    static STDOUT_ERROR: Mutex<Option<String>> = Mutex::new(None);

    fn record(e: &std::io::Error) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let mut slot = STDOUT_ERROR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            slot.get_or_insert_with(|| e.to_string());
        }
    }

    /// `print!`: a reader that went away (EPIPE) is ignored; the verb goes on and ends with its
    /// own exit code. Other errors are kept for [`stdout_error`].
    pub(crate) fn stdout(args: std::fmt::Arguments<'_>) {
        if let Err(e) = std::io::stdout().lock().write_fmt(args) {
            record(&e);
        }
    }

    /// Bytes on stdout, as [`stdout`].
    pub(crate) fn stdout_bytes(bytes: &[u8]) {
        if let Err(e) = std::io::stdout().lock().write_all(bytes) {
            record(&e);
        }
    }

    /// `eprint!`: stderr errors are ignored (there is nowhere left to report them).
    pub(crate) fn stderr(args: std::fmt::Arguments<'_>) {
        let _ = std::io::stderr().lock().write_fmt(args);
    }

    /// Flushes stdout before the process exits, as [`stdout`].
    pub(crate) fn flush() {
        if let Err(e) = std::io::stdout().lock().flush() {
            record(&e);
        }
    }

    /// The first stdout error that was not a closed pipe.
    pub(crate) fn stdout_error() -> Option<String> {
        STDOUT_ERROR.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}
