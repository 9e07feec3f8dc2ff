//! The command line (DESIGN §5), as clap definitions only: parsing validates and never acts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Safe, atomic, dead-man-timed firewall and conntrack changes on Linux.
#[derive(Debug, Parser)]
#[command(name = "ctguard", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Options every verb takes.
    #[command(flatten)]
    pub global: Global,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every verb takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Target network namespace: a name under /run/netns or an absolute path (default: the
    /// caller's own).
    #[arg(long, global = true, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Journal directory.
    #[arg(long, global = true, env = "CTGUARD_STATE_DIR", default_value = "/var/lib/ctguard")]
    pub state_dir: PathBuf,
    /// Agent socket directory.
    #[arg(long, global = true, env = "CTGUARD_RUN_DIR", default_value = "/run/ctguard")]
    pub run_dir: PathBuf,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines with timestamps.
    Text,
    /// One JSON object per line.
    Json,
    /// The systemd journal, with the transaction id as the field `CTGUARD_TXID` (chosen
    /// automatically when stderr is the journal, i.e. `JOURNAL_STREAM` names it).
    Journald,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a policy, diff it against the live state, plan the accept insertions and lint;
    /// with --ruleset FILE, what `apply --ruleset FILE` would do.
    Plan(PlanArgs),
    /// Print what the policy itself becomes (pure: no live state, no insertions).
    Render(RenderArgs),
    /// Apply a policy atomically and arm the dead-man timer (owned by the agent).
    Apply(ApplyArgs),
    /// Confirm a pending transaction (the single pending one without TXID).
    Confirm(TxidArgs),
    /// Move a pending transaction's deadline later.
    Extend {
        /// How much later: 90, 90s, 5m, 1h.
        #[arg(long)]
        by: String,
        /// The transaction.
        #[command(flatten)]
        txid: TxidArgs,
    },
    /// Roll a pending transaction back now; returns when the prior state is restored.
    Rollback(TxidArgs),
    /// Pending transactions and conntrack usage.
    Status,
    /// The journal: every transaction, newest last.
    History,
    /// One transaction: who, when, from where, diff, outcome.
    Show(ShowArgs),
    /// Conntrack diagnosis: usage, drops, kernel log, what fills the table, and the fix.
    Doctor(DoctorArgs),
    /// Run the agent in the foreground.
    Agent(AgentArgs),
    /// Journal recovery alone (run at boot): close what a reboot ended, hand the rest to an agent.
    Recover,
    /// Re-apply the committed, persisted policy (run at boot by ctguard-restore.service); does
    /// nothing when it is already in place.
    Restore(RestoreArgs),
    /// Print the manual page (roff) on stdout, or write one page per verb with --out-dir.
    Man(ManArgs),
    /// Print a shell completion script on stdout.
    Completions(CompletionsArgs),
}

/// `restore [--policy-file F]`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The policy to re-apply (default: committed-policy.toml in the state dir, written when a
    /// transaction with persistence was committed).
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// Dead-man timeout of the re-apply, which is confirmed at once when it succeeds.
    #[arg(long, default_value = "60s")]
    pub timeout: String,
    /// Re-apply despite lint errors.
    #[arg(long)]
    pub force: bool,
}

/// `man [--out-dir DIR]`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write ctguard.8 and one ctguard-VERB.8 per verb into DIR instead of printing.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// `completions SHELL`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `apply [POLICY]`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Policy file; default: the built-in policy.
    pub policy: Option<String>,
    /// Dead-man timeout: 90, 90s, 5m, 1h.
    #[arg(long, default_value = "60s")]
    pub timeout: String,
    /// Apply despite lint errors.
    #[arg(long)]
    pub force: bool,
    /// A ruleset transaction instead: an nft script or an iptables-restore dump; rollback
    /// restores the whole prior firewall.
    #[arg(long, value_name = "FILE", conflicts_with = "policy")]
    pub ruleset: Option<String>,
    /// Format of `--ruleset` (detected when absent; `ip6tables` for an IPv6 dump).
    #[arg(long, value_enum, requires = "ruleset")]
    pub format: Option<RulesetFormat>,
    /// Once COMMITTED, make the change survive reboot (sysctl.d, modules-load.d, modprobe.d and
    /// the committed policy re-applied at boot; with --ruleset, the host firewall service's
    /// file). Same as `persist = true` in the policy.
    #[arg(long)]
    pub persist: bool,
    /// A connectivity probe run by the agent in the target: `tcp:HOST:PORT`,
    /// `udp-dns:HOST:PORT:NAME`, `icmp:HOST`, `exec:CMD ARGS` (repeatable). `apply` waits for
    /// the first round: exit 0 if all pass, 5 if it rolled back.
    #[arg(long, value_name = "SPEC")]
    pub probe: Vec<String>,
    /// Repeat the probes at this interval until the deadline; any failure rolls back.
    #[arg(long, value_name = "D")]
    pub probe_interval: Option<String>,
    /// Commit when every probe of the first round passes (probes must not aim at the
    /// target's own addresses).
    #[arg(long)]
    pub auto_confirm: bool,
    /// Accept a confirm over the connection that applied (skips the new-connection proof).
    #[arg(long)]
    pub allow_same_connection: bool,
    /// Stay and count down (`netplan try` style): Ctrl-C rolls back now; Enter confirms where
    /// the new-connection proof is off.
    #[arg(long)]
    pub wait: bool,
    /// Re-apply what transaction TXID committed (its policy or its ruleset), as a new
    /// dead-man-protected transaction on the same target.
    #[arg(long, value_name = "TXID", conflicts_with_all = ["policy", "ruleset"])]
    pub from: Option<String>,
    /// Remove ctguard from the target: its table or raw chains, its accept insertions, and the
    /// sysctls it changed back to their values before ctguard's first committed change — as a
    /// new dead-man-protected transaction.
    #[arg(long, conflicts_with_all = ["policy", "ruleset", "from"])]
    pub remove: bool,
    /// Why: recorded with the transaction and shown by `status`, `history` and `show` (one
    /// line, at most 200 characters).
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<String>,
}

/// Format of a ruleset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RulesetFormat {
    /// An `nft -f` script.
    Nft,
    /// An iptables-restore dump (its family detected from its addresses: IPv4 unless IPv6).
    Iptables,
    /// An IPv6 iptables-restore dump (`ip6tables-restore`).
    Ip6tables,
}

/// An optional transaction id.
#[derive(Debug, Args)]
pub struct TxidArgs {
    /// Transaction id (default: the single pending transaction).
    pub txid: Option<String>,
}

/// `show TXID`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Transaction id.
    pub txid: String,
}

/// `agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Started by the CLI: exit once nothing is pending.
    #[arg(long, hide = true)]
    pub detached: bool,
}

/// `plan [POLICY] [--check]`, `plan --ruleset FILE [--format F] [--force]`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Policy file (TOML, or JSON by `.json` or a leading `{`); `-` reads stdin. Default: the
    /// built-in policy.
    pub policy: Option<String>,
    /// Also ask the kernel: nft check mode in the target, iptables in a scratch namespace.
    #[arg(long)]
    pub check: bool,
    /// Plan re-applying what policy transaction TXID committed (`apply --from`).
    #[arg(long, value_name = "TXID", conflicts_with = "policy")]
    pub from: Option<String>,
    /// Plan removing ctguard from the target (`apply --remove`).
    #[arg(long, conflicts_with_all = ["policy", "from"])]
    pub remove: bool,
    /// Plan a ruleset transaction (`apply --ruleset FILE`) instead: an nft script or an
    /// iptables-restore dump (a file, a pipe, or `-` for stdin). Shows the diff against the
    /// live state, runs the kernel check and the lint (ssh-lockout over SSH) exactly as apply
    /// prepares it, and exits as apply would (2 bad input, 3 refused by the kernel or a lint
    /// error without --force, 4 while a transaction is unfinished on the target). Changes
    /// nothing; needs no agent.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["policy", "from", "remove"])]
    pub ruleset: Option<String>,
    /// Format of `--ruleset` (detected when absent; `ip6tables` for an IPv6 dump).
    #[arg(long, value_enum, requires = "ruleset")]
    pub format: Option<RulesetFormat>,
    /// With `--ruleset`: plan as `apply --ruleset --force` would apply (lint errors become
    /// warnings, exit 0).
    #[arg(long, requires = "ruleset")]
    pub force: bool,
}

/// `render --format nft|iptables|ip6tables [POLICY]`.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Policy file; default: the built-in policy.
    pub policy: Option<String>,
    /// Output format; overrides the policy's `backend`.
    #[arg(long, value_enum)]
    pub format: Option<RenderFormat>,
}

/// What `render` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RenderFormat {
    /// `table inet ctguard` as an nft script.
    Nft,
    /// The IPv4 iptables-restore document.
    Iptables,
    /// The IPv6 iptables-restore document.
    Ip6tables,
}

/// `doctor [--emit-policy] [--prometheus FILE|-] [--top N]`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print a ready policy (TOML) for the target instead of the report (with --json: the
    /// report carries it as "policy"). Outside the initial namespace it leaves out the sysctls
    /// only the host can write, and says so.
    #[arg(long)]
    pub emit_policy: bool,
    /// Also write the figures in the node_exporter textfile format: to FILE atomically (temp
    /// file and rename), or to stdout with `-` (then nothing else is printed).
    #[arg(long, value_name = "FILE|-")]
    pub prometheus: Option<String>,
    /// How many (protocol, port, state) groups to show.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub top: u16,
    /// How long the drop, early_drop, insert_failed and invalid counters are watched: the
    /// recommendations rest on what moves during this window, not on the totals since the
    /// namespace started (`0`: one sample, totals only). At most 60s.
    #[arg(long, value_name = "D", default_value = "2s")]
    pub window: String,
}
