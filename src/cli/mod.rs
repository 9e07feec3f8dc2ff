//! The `ctguard` command: argument parsing ([`args`]) kept apart from the verbs that act.
//! Every error leaves as one line on stderr (`ctguard: error: …`) and a documented exit code.

pub mod args;
mod doctor;
mod ops;
pub(crate) mod plan;
mod render;
mod txn;

use std::io::Read;

use clap::Parser;

use crate::exit::{Exit, Failure};
use crate::model::{parse_policy, Format, Policy, MAX_POLICY_BYTES};
use args::{Cli, Command};

/// Runs the CLI with the process arguments; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { Exit::BadInput.code() } else { Exit::Ok.code() };
            let _ = e.print();
            return code;
        }
    };
    ops::init_logging(cli.global.verbose, cli.global.log_format);
    // Every verb that may act on or report transactions first revives a missing agent.
    match &cli.command {
        Command::Agent(_) | Command::Recover | Command::Render(_) | Command::Man(_) | Command::Completions(_) => {}
        _ => txn::revive_agent_if_needed(&cli.global),
    }
    let result = match &cli.command {
        Command::Render(a) => render::run(a, &cli.global),
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
        Command::Man(a) => ops::man(a),
        Command::Completions(a) => ops::completions(a),
    };
    match result {
        Ok(exit) => exit.code(),
        Err(failures) => {
            let mut code = Exit::Internal;
            for f in &failures {
                eprintln!("ctguard: error: {}", f.message);
                code = f.exit;
            }
            code.code()
        }
    }
}

/// Loads the policy named on the command line: a path, `-` for stdin, or none for the
/// built-in policy. Every validation problem becomes one exit-2 failure.
pub(crate) fn load_policy(arg: Option<&str>) -> Result<Policy, Vec<Failure>> {
    let Some(arg) = arg else { return Ok(Policy::builtin()) };
    let bad = |m: String| vec![Failure::bad_input(m)];
    let mut text = String::new();
    let limit = MAX_POLICY_BYTES as u64 + 1;
    let read = if arg == "-" {
        std::io::stdin().lock().take(limit).read_to_string(&mut text)
    } else {
        match std::fs::File::open(arg) {
            Ok(f) => {
                if f.metadata().is_ok_and(|m| m.len() > MAX_POLICY_BYTES as u64) {
                    return Err(bad(format!("policy {arg}: file is larger than the {MAX_POLICY_BYTES} byte limit")));
                }
                f.take(limit).read_to_string(&mut text)
            }
            Err(e) => Err(e),
        }
    };
    if let Err(e) = read {
        return Err(bad(format!("policy {arg}: cannot read: {e}")));
    }
    let format = Format::detect(Some(arg), &text);
    parse_policy(&text, format)
        .map_err(|errs| errs.into_iter().map(|e| Failure::bad_input(format!("policy {arg}: {e}"))).collect())
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

/// Prints a JSON value on stdout (pretty, one document).
/// A closed stdout (`ctguard … --json | head`) is not an error worth a panic.
pub(crate) fn print_json(v: &serde_json::Value) {
    use std::io::Write;
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            let _ = writeln!(std::io::stdout().lock(), "{s}");
        }
        Err(e) => eprintln!("ctguard: error: cannot encode JSON: {e}"),
    }
}
